"""The `b2p` command line: one Typer app whose commands follow the pipeline.

Each command lives in its stage's `commands.py` as a thin function (its docstring is its --help) over an
importable function that does the work. Heavy libraries (torch, fiftyone) are imported inside the
commands, so `b2p --help` stays fast. A B2PError becomes one red line and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import typer
import typer.core
from rich.console import Console

from b2p import __version__
from b2p.errors import B2PError

err_console = Console(stderr=True)

# click's UsageError as typer raises it (recent typer vendors its own click, so `click.UsageError` is
# another class); BadParameter derives from it in every version
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _UsageErrorsExit1(typer.core.TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type) exit with code 1 like every other
    refused input, not click's 2: scripts and DVC need one code meaning "bad input, nothing done"."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _UsageError as e:
            e.exit_code = 1
            raise

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _UsageError as e:
            e.exit_code = 1
            raise


app = typer.Typer(
    cls=_UsageErrorsExit1,
    name="b2p",
    help="Boxes in, pixel-accurate defect masks out.\n\n"
    "The recipe: import -> choose-teacher, teach -> train, predict, finalize -> combine -> train, predict, finalize "
    "(distilled) -> combine (final), deploy, export-onnx -> export, evaluate, summary; browse. "
    "`dvc repro` chains them (dvc.yaml); `add-batch` registers a new box-annotated batch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_error(e: B2PError) -> None:
    from rich.markup import escape  # messages quote user data such as "[x=3, y=4]": not markup

    err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)


def _clear_errors(fn: Callable) -> Callable:
    """A B2PError, or an OS error the user can act on (a full disk, a read-only folder, a name too long, no
    permission: fileio.OS_ERRORS) wherever it was raised, becomes one red line and exit code 1. Every output is
    written aside and swapped in only when complete (b2p.fileio), so the message can say the earlier one is kept."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from b2p.fileio import as_b2p_error

        try:
            return fn(*args, **kwargs)
        except B2PError as e:
            _print_error(e)
            raise typer.Exit(1) from None
        except OSError as e:
            clear = as_b2p_error(e, writing=False)
            if not isinstance(clear, B2PError):
                raise
            _print_error(clear)
            raise typer.Exit(1) from None

    return wrapper


# (command name, module, function) in pipeline order: this list is the CLI's table of contents.
COMMANDS = [
    ("demo-data", "b2p.ingest.commands", "demo_data"),
    ("masks-to-boxes", "b2p.ingest.commands", "masks_to_boxes"),
    ("import", "b2p.ingest.commands", "import_batch"),
    ("choose-teacher", "b2p.teach.commands", "choose_teacher"),
    ("teach", "b2p.teach.commands", "teach"),
    ("train", "b2p.student.commands", "train"),
    ("predict", "b2p.student.commands", "predict"),
    ("export-onnx", "b2p.deploy.commands", "export_onnx"),
    ("finalize", "b2p.finalize.commands", "finalize"),
    ("combine", "b2p.finalize.commands", "combine"),
    ("deploy", "b2p.finalize.commands", "deploy"),
    ("evaluate", "b2p.evaluate.commands", "evaluate"),
    ("export", "b2p.export.commands", "export"),
    ("browse", "b2p.browse.commands", "browse"),
    ("add-batch", "b2p.pipeline.commands", "add_batch"),
    ("summary", "b2p.pipeline.commands", "summary"),
    ("suite", "b2p.pipeline.commands", "suite"),
    ("suite-readme", "b2p.pipeline.commands", "suite_readme"),
]

for _name, _module, _func in COMMANDS:
    app.command(_name)(_clear_errors(getattr(importlib.import_module(_module), _func)))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"b2p {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Boxes in, pixel-accurate defect masks out."""
