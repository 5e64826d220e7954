"""`b2p browse`: the FiftyOne dataset of images, boxes, manual / teacher / student masks and scores."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from b2p.errors import B2PError

console = Console()


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_summary(summary, console: Console = console) -> None:
    """Rich tables of a BuildSummary: per-batch coverage, changes, tags, mean scores, views, notes."""
    t = Table(title=f"FiftyOne dataset {summary.name!r}: {summary.num_samples} samples ({summary.seconds:.1f} s)")
    for col in ("batch", "images", "manual", "teacher", "student", "final"):
        t.add_column(col, justify="left" if col == "batch" else "right")
    for b, c in summary.batches.items():
        t.add_row(b + ("  (newest)" if b == summary.newest_batch else ""), *(str(c.get(k, 0)) for k in ("images", "manual", "teacher", "student", "final")))
    console.print(t)
    console.print(
        f"added {summary.added}, updated {summary.updated}, unchanged {summary.unchanged}, removed {summary.removed}"
    )
    console.print(
        "tags: " + ", ".join(f"{k} {summary.tags.get(k, 0)}" for k in ("teacher_miss", "teacher_hallucination"))
        + "   mean: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.means.items())
    )
    console.print("saved views: " + ", ".join(summary.views))
    for n in summary.notes:
        console.print(f"[yellow]note:[/] {n}", highlight=False, soft_wrap=True)


def _is_loopback(address: str) -> bool:
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def recipe_sources(params: Path) -> dict[str, Path]:
    """The recipe's further mask sources (dvc.yaml's layout): the combined masks, every student alone and final."""
    from b2p.recipe import ALONE, FINAL, pool_sources

    out: dict[str, Path] = {"combined": Path("data/combined")}
    pools = ["candidates=data/students", "distill=data/distilled"]
    for label, alone in pool_sources(params, pools, leaf=ALONE).items():
        out[label] = alone
        out[f"{label}.final"] = alone.parent / FINAL
    return out


def browse(
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files."),
    batch: list[str] = typer.Option(None, "--batch", help="Batch name(s), repeatable or comma-separated; default every batch."),
    teacher_root: Path = typer.Option(Path("data/teach"), "--teacher-root", help="Teacher outputs (<root>/<batch>/labelmaps/). May be absent."),
    pred_root: Path = typer.Option(Path("data/model/masks"), "--pred-root", help="Student masks (<root>/<batch>/labelmaps/; default: the shipped student's). May be absent."),
    final_root: Path = typer.Option(Path("data/final"), "--final-root", help="Final masks of `b2p finalize` (<root>/<batch>/labelmaps/). May be absent."),
    pred_split: list[str] = typer.Option(
        None, "--pred-split", help="Splits the predictions cover (repeatable or comma-separated; default all). "
        "Images of other splits get no student mask instead of an error."),
    source: list[str] = typer.Option(None, "--source", help="A further mask source as its own field (with its IoU), NAME=ROOT; repeatable."),
    recipe: bool = typer.Option(False, "--recipe", help="Every source of the recipe as its own field: the combined masks and each student of `candidates:` / `distill:` (params.yaml) alone and final."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The recipe's params (its student lists), with --recipe."),
    name: str = typer.Option("b2p", "--name", help="FiftyOne dataset name (persistent)."),
    build_only: bool = typer.Option(False, "--build-only", help="Build/update the dataset and exit without the App."),
    address: str = typer.Option("127.0.0.1", "--address", help="Address the App listens on (local by default)."),
    port: int = typer.Option(5151, "--port", help="App port."),
    database_dir: Path = typer.Option(None, "--database-dir", help="FiftyOne database folder (default: FiftyOne's, or FIFTYONE_DATABASE_DIR)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow an --address other machines can reach (the App has no login)."),
) -> None:
    """Build or update a FiftyOne dataset from the pipeline's outputs and open it in the App.

    Inputs: canonical batches (--imported), teacher, student and final label maps (--teacher-root, --pred-root, --final-root).

    A missing root leaves that mask field empty; an existing root missing a label map is an error.

    Output: the persistent FiftyOne dataset --name, one sample per image keyed by batch/file (updated in place).

    Fields: boxes; manual, teacher, student (the shipped student), final masks; teacher/student/final IoU against the manual mask; disagreement; with --recipe (or --source) every further source as its own field with its IoU. Masks are coloured by field.

    Tags: teacher_miss, teacher_hallucination.

    Saved views: worst-teacher, student-fixed-teacher, newest-batch, by-disagreement, teacher-errors, worst-final.

    Then serves the App at http://ADDRESS:PORT until Ctrl+C, unless --build-only.
    """
    import importlib.util

    if importlib.util.find_spec("fiftyone") is None:
        raise B2PError('`b2p browse` needs FiftyOne, an optional extra: pip install -e ".[app]" (or pip install "b2p[app]")')
    if not 0 < port < 65536:
        raise B2PError(f"--port must be 1..65535, got {port}")
    if not build_only and not allow_remote and not _is_loopback(address):
        raise B2PError(
            f"--address {address} would serve the FiftyOne App, which has no login, to other machines; "
            "add --allow-remote if that is what you want (or keep the default 127.0.0.1)"
        )
    from b2p.browse.build import build_dataset
    from b2p.browse.fo_env import configure_env
    from b2p.project import parse_batch_names, resolve_batch_files
    from b2p.splits import SPLITS

    configure_env(database_dir)
    files = resolve_batch_files(imported, batch)
    splits = parse_batch_names(pred_split) or list(SPLITS)
    extras = recipe_sources(params) if recipe else {}
    for item in source or []:
        n, sep, root = item.partition("=")
        if not sep or not n.strip() or not root.strip():
            raise B2PError(f"--source must be NAME=ROOT, got {item!r}")
        extras[n.strip()] = Path(root.strip())
    summary = build_dataset(files, teacher_root, pred_root, name=name, pred_splits=splits, final_root=final_root, extra_roots=extras)
    print_summary(summary)
    if build_only:
        return
    from b2p.browse.app import launch

    def ready(url: str, seconds: float) -> None:
        console.print(f"[bold green]FiftyOne App[/] ready in {seconds:.1f} s at [link={url}]{url}[/link]  (Ctrl+C to stop)")

    if not _is_loopback(address):  # only reached with --allow-remote
        console.print(f"[bold yellow]warning:[/] the App has no login: anyone who can reach {address}:{port} sees these images")
    console.print(f"starting the FiftyOne App on {address}:{port} ...")
    launch(name, address=address, port=port, wait=True, on_ready=ready)
