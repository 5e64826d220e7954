"""`b2p suite`: run the benchmark suite (pipelines/suite/dvc.yaml) with independent stages side by side.

The suite's only definition is its dvc.yaml + params.yaml. This runner asks DVC for the resolved stages
(interpolated commands, dependencies, outputs: `Repo.stage.collect`), orders them by their data
dependencies (a stage waits for every stage whose output it reads) and runs up to `jobs` of them at once,
each with `threads` torch threads. Why: DVC runs one stage at a time, and on a 2-core machine two
single-threaded trainings side by side finish sooner than one two-threaded (PyTorch's 2-thread pool mostly
waits at barriers at these sizes); the default runs three on two cores, so that the last long stages (the
distilled trainings, which wait for every row of their seed) share both cores instead of one running alone.
Each stage's wall time and log are kept; the report stage runs last, given those times (`--times`), and
writes reports/<dataset>/.

The runner does not update dvc.lock: `dvc commit pipelines/suite/dvc.yaml` records its outputs for DVC.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from b2p.errors import B2PError
from b2p.fileio import write_json_atomic, write_text_atomic

REPORT_STAGE = "report"
TIMES_FILE = "work/stage_times.json"  # relative to the suite folder
LOGS_DIR = "work/logs"


@dataclass
class SuiteStage:
    """One resolved stage: what to run, where, and which paths it reads and writes (absolute)."""

    name: str
    cmd: str
    wdir: Path
    deps: list[Path]
    outs: list[Path]
    after: set[str] = field(default_factory=set)  # stages whose outputs this one reads


def dataset_name_of(root: str | Path) -> str:
    """A batch / report name from a dataset folder: lower case, runs of other characters -> '-'."""
    name = re.sub(r"[^a-z0-9]+", "-", Path(root).resolve().name.lower()).strip("-")
    if not name:
        raise B2PError("cannot derive a dataset name from this folder; pass --name", root)
    return name


def parse_override(spec: str) -> tuple[list[str], object]:
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


STUDENT_LISTS = ("students", "oracle.students", "boxes_only.students", "round2.students", "distill.students")


def check_variants(suite_dir: Path, data: dict, params_file: Path) -> None:
    """Every student named in the suite's lists has its students/<name>.yaml: a misspelt name would otherwise
    fail only when its training stage comes up, after every stage before it (the distilled students: at the end)."""
    have = sorted(p.stem for p in (suite_dir / "students").glob("*.yaml"))
    for key in STUDENT_LISTS:
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        if not isinstance(node, list):
            raise B2PError(f"`{key}` must be a list of student variants (students/<name>.yaml), got {node!r}", params_file)
        missing = [str(n) for n in node if str(n) not in have]
        if missing:
            raise B2PError(f"`{key}` names {', '.join(missing)}: no students/<name>.yaml for it (variants here: "
                           f"{', '.join(have)})", params_file)
    # the rule scores read the models of `students:` trainings: a student not trained there has none
    untrained = [str(n) for n in ((data.get("select") or {}).get("students") or []) if n not in (data.get("students") or [])]
    if untrained:
        raise B2PError(f"`select.students` names {', '.join(untrained)}, not in `students:` (only those are trained on every teacher)", params_file)


def set_dataset(suite_dir: Path, root: Path | None, name: str | None, overrides: list[str] = ()) -> tuple[str, str]:
    """Write `dataset.root` (relative to the suite folder), `dataset.name` and any `KEY=VALUE` overrides into
    the suite's params.yaml, keeping its comments (as `dvc exp run -S` does); returns the (root, name) now
    in effect. An override of a key that is not there is an error (a misspelt key must not be ignored)."""
    from b2p.pipeline.batches import dump_params, load_params

    params_file = suite_dir / "params.yaml"
    data = load_params(params_file)
    for spec in overrides:
        parts, value = parse_override(spec)
        node = data
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise B2PError(f"--set {spec}: no key {'.'.join(parts[: i + 1])!r} in the suite's params", params_file)
            if i < len(parts) - 1:
                node = node[part]
        node[parts[-1]] = value
    ds = data.get("dataset")
    if not isinstance(ds, dict) or "root" not in ds or "name" not in ds:
        raise B2PError("no `dataset:` section with `root` and `name`", params_file)
    check_variants(suite_dir, data, params_file)
    if root is not None:
        if not root.is_dir():
            raise B2PError("dataset root not found", root)
        ds["root"] = os.path.relpath(root.resolve(), suite_dir.resolve())
        ds["name"] = name or dataset_name_of(root)
    elif name:
        ds["name"] = name
    write_text_atomic(params_file, dump_params(data))
    return str(ds["root"]), str(ds["name"])


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies below it."""
    return a == b or b in a.parents


def resolve_stages(dvc_file: Path) -> list[SuiteStage]:
    """The stages of `dvc_file` as DVC resolves them from params.yaml, each with the stages it waits for."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        repo = Repo(Repo.find_root(str(dvc_file.parent)))
        collected = repo.stage.collect(str(dvc_file))
    except DvcException as e:
        raise B2PError(f"DVC cannot resolve the suite: {e}", dvc_file) from None
    stages = [
        SuiteStage(
            name=s.name,
            cmd=s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
            wdir=Path(s.wdir),
            deps=[Path(d.fs_path) for d in s.deps],
            outs=[Path(o.fs_path) for o in s.outs],
        )
        for s in collected
    ]
    for s in stages:
        for other in stages:
            if other is not s and any(_inside(d, o) or _inside(o, d) for d in s.deps for o in other.outs):
                s.after.add(other.name)
    return stages


def _run_stage(stage: SuiteStage, log: Path, env: dict[str, str]) -> float:
    """Run one stage's command (its outputs removed first, as DVC does); returns wall seconds."""
    for o in stage.outs:
        if o.is_dir():
            shutil.rmtree(o)
        elif o.exists():
            o.unlink()
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {stage.cmd}\n")
        f.flush()
        rc = subprocess.run(stage.cmd, shell=True, cwd=stage.wdir, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        # the last line that says something (rich draws error panels with box characters)
        said = [t for t in (ln.strip(" │╭╮╰╯─\t") for ln in log.read_text(errors="replace").splitlines()) if t]
        raise B2PError(f"stage {stage.name} failed (exit {rc}): {said[-1] if said else ''}", log)
    return time.perf_counter() - t0


def chain_lengths(stages: list[SuiteStage], cost: dict[str, float] | None = None) -> dict[str, float]:
    """Per stage, the cost of the longest chain of stages that waits for it (itself included): the sum of
    their `cost` (expected seconds), or their number without one.

    The runner starts the ready stage with the longest chain first (list scheduling by critical path): a
    seed's distilled student waits for every row of its seed and trains 3-4x as long as any of them; started
    last, it would run alone at the end while the other core idles."""
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
    """Each stage's expected wall time from an earlier run's stage times: its own, else the median of the
    stages of its kind (`train_distill` of `train_distill@auto-b2p-lite-3`: a new seed or student), else the
    median of all. None without earlier times (the runner then counts stages)."""
    import statistics

    if not previous:
        return None
    kinds: dict[str, list[float]] = {}
    for n, t in previous.items():
        kinds.setdefault(n.split("@")[0], []).append(float(t))
    overall = statistics.median(float(t) for t in previous.values())
    return {n: float(previous[n]) if n in previous else statistics.median(kinds.get(n.split("@")[0], [overall])) for n in names}


def previous_stage_seconds(suite_dir: Path, dataset: str | None) -> tuple[dict[str, float], Path | None]:
    """The stage times of the last run: this suite folder's own record (TIMES_FILE), else the dataset's
    committed report (reports/<dataset>/results.json, which a fresh clone has). ({}, None) when neither
    exists or is readable: a missing estimate only changes the order the stages start in, never a result."""
    import json

    candidates = [suite_dir / TIMES_FILE]
    if dataset:
        candidates.append(suite_dir / ".." / ".." / "reports" / dataset / "results.json")
    for path in candidates:
        try:
            times = json.loads(path.read_text()).get("stage_seconds") or {}
        except (OSError, ValueError, AttributeError):
            continue
        times = {str(k): float(v) for k, v in times.items() if isinstance(v, (int, float)) and v > 0}
        if times:
            return times, path.resolve()
    return {}, None


def run_suite(
    suite_dir: Path, jobs: int = 3, threads: int = 1, command: str | None = None, progress: bool = True, dataset: str | None = None
) -> dict:
    """Run every stage of SUITE_DIR/dvc.yaml (report last, with the stage times); returns the times record.
    The stages start in the order of their longest waiting chain in seconds, estimated from the last run's
    times (`previous_stage_seconds`; `dataset` names its report)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    suite_dir = suite_dir.resolve()
    stages = resolve_stages(suite_dir / "dvc.yaml")
    by_name = {s.name: s for s in stages}
    if REPORT_STAGE not in by_name:
        raise B2PError(f"the suite has no `{REPORT_STAGE}` stage", suite_dir / "dvc.yaml")
    report = by_name.pop(REPORT_STAGE)
    if jobs < 1 or threads < 1:
        raise B2PError(f"--jobs and --threads must be at least 1, got {jobs} and {threads}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this b2p, this venv
    times_file = suite_dir / TIMES_FILE
    previous, previous_source = previous_stage_seconds(suite_dir, dataset)  # read before the old record goes
    times_file.unlink(missing_ok=True)  # a stale record must never pass for this run's
    seconds: dict[str, float] = {}
    done: set[str] = set()
    chain = chain_lengths(list(by_name.values()), expected_seconds(list(by_name), previous))
    # the longest chain of waiting stages first, DVC's order among equals (sorted() is stable)
    pending = sorted(by_name, key=lambda n: -chain[n])
    # said relative to the project (pipelines/suite/../..): the record is committed with the report
    order = ("expected seconds from " + os.path.relpath(previous_source, suite_dir.parent.parent) if previous_source
             else "stage count (no earlier stage times)")
    running: dict[Future, str] = {}
    failure: B2PError | None = None
    t_all = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with ThreadPoolExecutor(max_workers=jobs) as pool, Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("suite", total=len(by_name) + 1)
        bar.console.print(f"stages start longest waiting chain first, by {order}", highlight=False)
        while pending or running:
            if failure is None:
                for name in [n for n in pending if by_name[n].after <= done][: jobs - len(running)]:
                    pending.remove(name)
                    log = suite_dir / LOGS_DIR / f"{name.replace('@', '_')}.log"
                    running[pool.submit(_run_stage, by_name[name], log, env)] = name
            elif not running:
                break
            if not running:  # nothing can start: a dependency cycle or a stage reading a missing output
                raise B2PError(f"stages cannot start (waiting on each other): {', '.join(pending)}", suite_dir / "dvc.yaml")
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
    record = {
        "command": command or shlex.join(["b2p", *sys.argv[1:]]),
        "jobs": jobs,
        "threads_per_stage": threads,
        "order": order,
        "stage_seconds": seconds,
        "total_seconds": round(time.perf_counter() - t_all, 1),  # without the report stage
    }
    write_json_atomic(times_file, record)
    _run_stage(
        SuiteStage(report.name, f"{report.cmd} --times {shlex.quote(TIMES_FILE)}", report.wdir, report.deps, report.outs),
        suite_dir / LOGS_DIR / "report.log",
        env,
    )
    return record
