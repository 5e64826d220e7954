"""`b2p suite`: the recipe (the project's dvc.yaml) on a benchmark dataset, over several seeds.

The suite has no stages of its own. For each seed it makes a workspace, pipelines/suite/<name>/seed-<N>/,
that is a b2p project as a user would have it: its own DVC repository (`dvc init --subdir`), the
project's dvc.yaml and b2p/ as symlinks (one definition of every stage; code changes re-run what they
touch), a params.yaml that is the project's with the suite's overrides (pipelines/suite/params.yaml
`recipe:`) and `base.seed: N`, and the dataset added with `b2p add-batch` from a COCO batch with manual
masks for some images: the user's own, or one `b2p masks-to-boxes` simulates from a dataset with masks
(then also data/manual/, every image's mask, for the oracle rows).

Running: DVC resolves each workspace's stages (commands, deps, outs); the runner runs the out-of-date ones
(`dvc status`) and everything downstream of them, up to `jobs` at once in dependency order, longest
waiting chain first (`chain_lengths`). Why not `dvc repro`: it runs one stage at a time, and on a 2-core
machine three single-threaded trainings side by side finish sooner than one after the other. A stage that
reads no seed (import, the teachers, teach: nothing upstream of it reads `base.seed`) runs once, in the
first workspace; the others get a copy of its outputs. Each stage is recorded in its workspace's dvc.lock
(`dvc commit`) as soon as it finishes, so a suite that was stopped resumes where it stopped, and after the
run `dvc repro` there is a no-op; the report (b2p/pipeline/results.py) goes to reports/<name>/.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.fileio import write_json_atomic, write_text_atomic

SUITE_DIR = Path("pipelines/suite")  # relative to the project root
SEED_PARAM = "base.seed"
TIMES_FILE = "stage_times.json"  # in the dataset's suite folder


@dataclass
class SuiteStage:
    """One resolved stage of one workspace: what to run, where, which paths it reads and writes (absolute)."""

    name: str  # seed-<N>/<stage>
    cmd: str
    wdir: Path
    deps: list[Path]
    outs: list[Path]
    params: set[str] = field(default_factory=set)
    after: set[str] = field(default_factory=set)  # stages whose outputs this one reads
    copy_of: SuiteStage | None = None  # a seed-free stage of another workspace: copy its outputs instead


@dataclass
class BatchSource:
    """The batch every workspace adds: images + COCO boxes (+ manual masks), optionally the oracle's masks."""

    images: Path
    coco: Path | None = None
    yolo_labels: Path | None = None
    yolo_classes: Path | None = None
    masks: Path | None = None
    manual: Path | None = None  # teacher-layout root of every image's manual mask (masks-to-boxes)


def dataset_name_of(root: str | Path) -> str:
    """A batch / report name from a dataset folder: lower case, runs of other characters -> '-'."""
    name = re.sub(r"[^a-z0-9]+", "-", Path(root).resolve().name.lower()).strip("-")
    if not name:
        raise B2PError("cannot derive a dataset name from this folder; pass --name", root)
    return name


def parse_override(spec: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` (VALUE read as YAML: 8, 0.5, [1, 2], text) -> (["a", "b"], value)."""
    import yaml

    key, sep, value = spec.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise B2PError(f"--set must look like KEY=VALUE (e.g. train.epochs=8 or seeds=[1,2]), got {spec!r}")
    try:
        return parts, yaml.safe_load(value)
    except yaml.YAMLError:
        raise B2PError(f"--set {key}: the value is not valid YAML: {value!r}") from None


def suite_settings(project: Path, overrides: list[str] = ()) -> dict:
    """pipelines/suite/params.yaml with the `--set` overrides applied (a key must exist, or be under `recipe:`)."""
    from b2p.params import read_params_file

    path = project / SUITE_DIR / "params.yaml"
    data = read_params_file(path)
    for spec in overrides:
        parts, value = parse_override(spec)
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if parts[0] != "recipe" or part in node:
                    raise B2PError(f"--set {spec}: no group {'.'.join(parts[: i + 1])!r} in the suite's params", path)
                node[part] = {}
            node = node[part]
        if parts[-1] not in node and parts[0] != "recipe":
            raise B2PError(f"--set {spec}: no key {'.'.join(parts)!r} in the suite's params", path)
        node[parts[-1]] = value
    if "oracle_seeds" in data and not (isinstance(data["oracle_seeds"], list) and set(data["oracle_seeds"]) <= set(data.get("seeds") or [])):
        raise B2PError(f"`oracle_seeds` must be a list of some of the `seeds`, got {data['oracle_seeds']!r}", path)
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise B2PError(f"`seeds` must be a list of distinct non-negative integers, got {seeds!r}", path)
    return data


# --- the workspaces -------------------------------------------------------------------------------------------


def simulate_batch(root: Path, name: str, folder: Path, settings: dict) -> BatchSource:
    """`b2p masks-to-boxes` of a dataset with masks into FOLDER: boxes for every image, the masks of a hashed
    share of them (`masks_to_boxes.masked`), and every image's mask as the oracle's teacher root."""
    from b2p.ingest.from_masks import masks_to_boxes
    from b2p.schema import validate

    p = validate("masks_to_boxes", settings.get("masks_to_boxes") or {})
    if p.masked is None:
        raise B2PError("the suite needs `masks_to_boxes.masked` (the share of images whose manual masks are kept)")
    manual = folder / "manual"
    shutil.rmtree(manual, ignore_errors=True)
    masks_to_boxes(root, folder / "boxes.json", name, strip_prefix=p.strip_prefix, threshold=p.threshold, min_area=p.min_area,
                   free_images=p.free_images, rule=p.split_rule(), oracle_out=manual, masked=p.masked)
    return BatchSource(images=root, coco=folder / "boxes.json", manual=manual)


def workspace_params(project: Path, seed: int, recipe: dict) -> str:
    """The project's params.yaml for one workspace: no demo, no batch yet, this seed, the suite's overrides."""
    from b2p.pipeline.batches import dump_params, load_params

    data = load_params(project / "params.yaml")
    data["demos"] = {}
    data["batches"] = {}
    _merge_into(data, recipe)
    data.setdefault("base", {})["seed"] = seed
    return f"# generated by `b2p suite` from {project / 'params.yaml'} + {project / SUITE_DIR / 'params.yaml'}\n" + dump_params(data)


def _merge_into(node: Any, layer: dict) -> None:
    for k, v in layer.items():
        if isinstance(v, dict) and hasattr(node.get(k), "keys"):
            _merge_into(node[k], v)
        else:
            node[k] = v


def make_workspace(project: Path, ws: Path, seed: int, name: str, source: BatchSource, recipe: dict) -> None:
    """Create or refresh one seed's workspace (module docstring); an unchanged one is left as it is."""
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".dvc").is_dir():  # its own DVC repository: the project's `dvc repro` never parses it
        try:
            _run(["dvc", "init", "--subdir", "-q"], ws)  # inside the project's git repository
        except B2PError:
            _run(["dvc", "init", "--no-scm", "-q"], ws)  # a project outside git
    for link in ("dvc.yaml", "b2p"):
        target = Path(os.path.relpath(project / link, ws))
        if (ws / link).is_symlink() and Path(os.readlink(ws / link)) == target:
            continue
        if (ws / link).exists() or (ws / link).is_symlink():
            (ws / link).unlink()
        (ws / link).symlink_to(target)
    params = workspace_params(project, seed, recipe)
    raw = ws / "data" / "raw" / name
    if raw.is_dir() and not _same_batch(raw, source):  # the dataset's boxes changed: add it again
        shutil.rmtree(raw)
    if not raw.is_dir():
        write_text_atomic(ws / "params.yaml", params)
        (ws / "data" / "classes.json").unlink(missing_ok=True)
        cmd = ["b2p", "add-batch", str(source.images), "--name", name, "--add-classes"]
        for opt, value in (("--coco", source.coco), ("--yolo-labels", source.yolo_labels), ("--yolo-classes", source.yolo_classes), ("--masks", source.masks)):
            if value is not None:
                cmd += [opt, str(Path(value).resolve())]
        _run(cmd, ws)
    else:  # the batch is in place: refresh the params around its entry (what add-batch registered)
        from b2p.pipeline.batches import batch_entry, dump_params, registered_batches

        entry = registered_batches(ws / "params.yaml").get(name) or batch_entry(name, "data/raw", "coco" if source.coco else "yolo", source.masks is not None)
        fresh = load_params_text(params)
        fresh["batches"] = {name: entry}
        write_text_atomic(ws / "params.yaml", params.split("\n", 1)[0] + "\n" + dump_params(fresh))
    if source.manual is not None:
        dst = ws / "data" / "manual"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(source.manual, dst)


def load_params_text(text: str):
    from b2p.params import parse_yaml

    return parse_yaml(text, what="generated params", round_trip=True)


def _same_batch(raw: Path, source: BatchSource) -> bool:
    from b2p.fileio import sha256_file

    if source.coco is None:
        return True  # a YOLO batch: add-batch refuses a changed one itself
    copied = raw / "annotations.json"
    return copied.is_file() and sha256_file(copied) == sha256_file(source.coco)


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        said = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise B2PError(f"`{shlex.join(cmd)}` failed (exit {r.returncode}): {said[-1] if said else ''}", cwd)


# --- the stages -----------------------------------------------------------------------------------------------


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies below it."""
    return a == b or b in a.parents


def resolve_stages(ws: Path, prefix: str) -> list[SuiteStage]:
    """The stages of WS/dvc.yaml as DVC resolves them from WS/params.yaml, each with the stages it waits for."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(ws)) as repo:
            collected = repo.stage.collect(str(ws / "dvc.yaml"))
            stages = [
                SuiteStage(
                    name=f"{prefix}{s.name}",
                    cmd=s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
                    wdir=Path(s.wdir),
                    deps=[Path(d.fs_path) for d in s.deps if type(d).__name__ != "ParamsDependency"],
                    outs=[Path(o.fs_path) for o in s.outs],
                    params={k for d in s.deps if type(d).__name__ == "ParamsDependency" for k in d.params},
                )
                for s in collected
            ]
    except DvcException as e:
        raise B2PError(f"DVC cannot resolve the recipe: {e}", ws / "dvc.yaml") from None
    for s in stages:
        for other in stages:
            if other is not s and any(_inside(d, o) or _inside(o, d) for d in s.deps for o in other.outs):
                s.after.add(other.name)
    return stages


def out_of_date(ws: Path, prefix: str) -> set[str]:
    """The stages `dvc status` reports changed in WS (prefixed)."""
    from dvc.repo import Repo

    with Repo(str(ws)) as repo:
        status = repo.status()
    return {f"{prefix}{name.split(':')[-1]}" for name in status}


def seed_free(stages: list[SuiteStage]) -> set[str]:
    """Stages that read no seed, themselves or through any stage upstream."""
    by_name = {s.name: s for s in stages}
    memo: dict[str, bool] = {}

    def seeded(name: str) -> bool:
        if name not in memo:
            memo[name] = False  # (a cycle is reported by the runner)
            s = by_name[name]
            memo[name] = any(p == SEED_PARAM or p.startswith(SEED_PARAM + ".") or p == "base" for p in s.params) or any(seeded(a) for a in s.after)
        return memo[name]

    return {s.name for s in stages if not seeded(s.name)}


def plan(workspaces: dict[int, Path]) -> list[SuiteStage]:
    """Every workspace's stages to run (out of date, or downstream of one), seed-free ones once (module
    docstring); the first workspace's seed-free stages are the originals the others copy."""
    first_seed = next(iter(workspaces))
    per_ws = {seed: resolve_stages(ws, f"seed-{seed}/") for seed, ws in workspaces.items()}
    changed = set().union(*(out_of_date(ws, f"seed-{seed}/") for seed, ws in workspaces.items()))
    free = {n.split("/", 1)[1] for n in seed_free(per_ws[first_seed])}
    originals = {s.name.split("/", 1)[1]: s for s in per_ws[first_seed]}
    stages: list[SuiteStage] = []
    for seed, ws_stages in per_ws.items():
        for s in ws_stages:
            short = s.name.split("/", 1)[1]
            if seed != first_seed and short in free:
                s.copy_of = originals[short]
                s.after = s.after | {originals[short].name}  # its own upstream too: its lock entry hashes those
            stages.append(s)
    return _with_descendants(stages, changed)


def _with_descendants(stages: list[SuiteStage], changed: set[str]) -> list[SuiteStage]:
    waiting: dict[str, list[str]] = {}
    for s in stages:
        for a in s.after:
            waiting.setdefault(a, []).append(s.name)
    run, todo = set(), [s.name for s in stages if s.name in changed or (s.copy_of is not None and s.copy_of.name in changed)]
    while todo:
        n = todo.pop()
        if n not in run:
            run.add(n)
            todo += waiting.get(n, [])
    keep = [s for s in stages if s.name in run]
    for s in keep:
        s.after &= run  # an up-to-date stage is no longer waited for
    return keep


def run_stage(stage: SuiteStage, log: Path, env: dict[str, str]) -> float:
    """Run one stage's command in its workspace (its outputs removed first, as DVC does), or copy the outputs
    of the stage it stands for; returns wall seconds."""
    for o in stage.outs:
        if o.is_dir() and not o.is_symlink():
            shutil.rmtree(o)
        elif o.exists() or o.is_symlink():
            o.unlink()
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if stage.copy_of is not None:
        for src, dst in zip(stage.copy_of.outs, stage.outs):
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        log.write_text(f"copied the outputs of {stage.copy_of.name}\n")
        return time.perf_counter() - t0
    with open(log, "w") as f:
        f.write(f"$ {stage.cmd}\n")
        f.flush()
        rc = subprocess.run(stage.cmd, shell=True, cwd=stage.wdir, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        # the last line that says something (rich draws error panels with box characters)
        said = [t for t in (ln.strip(" │╭╮╰╯─\t") for ln in log.read_text(errors="replace").splitlines()) if t]
        raise B2PError(f"stage {stage.name} failed (exit {rc}): {said[-1] if said else ''}", log)
    return time.perf_counter() - t0


_commit_locks: dict[Path, threading.Lock] = {}


def commit_stage(stage: SuiteStage) -> None:
    """Record one finished stage in its workspace's dvc.lock (one `dvc commit` per workspace at a time: DVC
    holds a lock on its repository)."""
    lock = _commit_locks.setdefault(stage.wdir, threading.Lock())
    with lock:
        _run(["dvc", "commit", "--force", "--quiet", stage.name.split("/", 1)[1]], stage.wdir)


def _run_and_commit(stage: SuiteStage, log: Path, env: dict[str, str]) -> float:
    seconds = run_stage(stage, log, env)
    commit_stage(stage)
    return seconds


def chain_lengths(stages: list[SuiteStage], cost: dict[str, float] | None = None) -> dict[str, float]:
    """Per stage, the cost of the longest chain of stages that waits for it (itself included): the sum of
    their `cost` (expected seconds), or their number without one. The runner starts the ready stage with
    the longest chain first (list scheduling by critical path): a distilled student waits for every
    candidate of its seed and trains longer than any; started last, it would run alone at the end."""
    waiting: dict[str, list[str]] = {s.name: [] for s in stages}
    for s in stages:
        for a in s.after:
            waiting.setdefault(a, []).append(s.name)
    memo: dict[str, float] = {}

    def length(name: str, seen: frozenset = frozenset()) -> float:
        if name not in memo:
            if name in seen:  # a cycle is reported by the runner, never looped on here
                return 0
            own = 1.0 if cost is None else cost[name]
            memo[name] = own + max((length(n, seen | {name}) for n in waiting.get(name, [])), default=0)
        return memo[name]

    return {s.name: length(s.name) for s in stages}


def expected_seconds(names: list[str], previous: dict[str, float]) -> dict[str, float] | None:
    """Each stage's expected wall time from an earlier run's stage times (keyed without the seed): its own,
    else the median of its kind (`train` of `train@bitfit`), else the median of all; None without any."""
    import statistics

    if not previous:
        return None
    kinds: dict[str, list[float]] = {}
    for n, t in previous.items():
        kinds.setdefault(n.split("@")[0], []).append(float(t))
    overall = statistics.median(float(t) for t in previous.values())

    def guess(name: str) -> float:
        short = name.split("/", 1)[-1]
        return float(previous[short]) if short in previous else statistics.median(kinds.get(short.split("@")[0], [overall]))

    return {n: guess(n) for n in names}


def previous_stage_seconds(paths: list[Path]) -> tuple[dict[str, float], Path | None]:
    """The per-stage times (median over seeds) of the first readable record: an earlier run's, else the
    committed report's (which a fresh clone has). A missing estimate only changes the order stages start in."""
    import json
    import statistics

    for path in paths:
        try:
            times = json.loads(path.read_text()).get("stage_seconds") or {}
        except (OSError, ValueError, AttributeError):
            continue
        by_stage: dict[str, list[float]] = {}
        for k, v in times.items():
            if isinstance(v, (int, float)) and v > 0:
                by_stage.setdefault(str(k).split("/", 1)[-1], []).append(float(v))
        if by_stage:
            return {k: statistics.median(v) for k, v in by_stage.items()}, path.resolve()
    return {}, None


def run_stages(stages: list[SuiteStage], logs: Path, jobs: int, threads: int, previous: dict[str, float], progress: bool = True) -> dict[str, float]:
    """Run `stages` up to `jobs` at once in dependency order, longest expected chain first; {stage: seconds}."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if jobs < 1 or threads < 1:
        raise B2PError(f"--jobs and --threads must be at least 1, got {jobs} and {threads}")
    by_name = {s.name: s for s in stages}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this b2p, this venv
    chain = chain_lengths(stages, expected_seconds(list(by_name), previous))
    pending = sorted(by_name, key=lambda n: -chain[n])  # DVC's order among equals (sorted() is stable)
    seconds: dict[str, float] = {}
    done: set[str] = set()
    running: dict[Future, str] = {}
    failure: B2PError | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with ThreadPoolExecutor(max_workers=jobs) as pool, Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("suite", total=len(by_name))
        while pending or running:
            if failure is None:
                for name in [n for n in pending if by_name[n].after <= done][: jobs - len(running)]:
                    pending.remove(name)
                    log = logs / f"{name.replace('/', '_').replace('@', '_')}.log"
                    running[pool.submit(_run_and_commit, by_name[name], log, env)] = name
            elif not running:
                break
            if not running:  # nothing can start: a dependency cycle
                raise B2PError(f"stages cannot start (waiting on each other): {', '.join(pending)}")
            bar.update(task, description=f"running {', '.join(sorted(running.values()))}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                try:
                    seconds[name] = round(fut.result(), 1)
                    done.add(name)
                    bar.advance(task)
                    bar.console.print(f"{seconds[name]:8.1f} s  {name}", highlight=False)
                except B2PError as e:  # let the running stages finish, start nothing new, then stop
                    failure = failure or e
    if failure is not None:
        raise failure
    return seconds


def run_suite(
    project: Path,
    name: str,
    source_root: Path | None = None,
    batch: BatchSource | None = None,
    overrides: list[str] = (),
    jobs: int = 3,
    threads: int = 1,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """The whole suite (module docstring): workspaces, stages, commit, report; returns the times record."""
    from b2p.pipeline.results import collect_results, write_results

    project = project.resolve()
    settings = suite_settings(project, overrides)
    home = project / SUITE_DIR / name
    if (source_root is None) == (batch is None):
        raise B2PError("give the dataset as a folder with masks (--root) or as a batch (--coco / --yolo-labels), not both")
    t_all = time.perf_counter()
    if source_root is not None:  # absolute: the boxes file records it, and a changed one means a new batch
        batch = simulate_batch(Path(source_root).resolve(), name, home / "source", settings)
    workspaces = {int(s): home / f"seed-{s}" for s in settings["seeds"]}
    oracle_seeds = settings.get("oracle_seeds", settings["seeds"])
    for seed, ws in workspaces.items():
        recipe = dict(settings.get("recipe") or {})
        if batch.manual is None or seed not in oracle_seeds:  # a user's batch has nothing to train an oracle on
            recipe["oracle"] = {"students": []}
        make_workspace(project, ws, seed, name, batch, recipe)
    stages = plan(workspaces)
    previous, previous_source = previous_stage_seconds([home / TIMES_FILE, project / "reports" / name / "results.json"])
    seconds = run_stages(stages, home / "logs", jobs, threads, previous, progress)
    record = {
        "command": command or shlex.join(["b2p", *sys.argv[1:]]),
        "jobs": jobs,
        "threads_per_stage": threads,
        "order": f"expected seconds from {os.path.relpath(previous_source, project)}" if previous_source else "stage count (no earlier stage times)",
        "stage_seconds": seconds,
        "stages_run": len(seconds),
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    write_json_atomic(home / TIMES_FILE, record)
    results = collect_results(workspaces, name, settings, record, source=str(source_root or batch.images))
    write_results(results, project / "reports" / name)
    return record
