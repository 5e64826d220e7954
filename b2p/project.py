"""How multi-batch commands find their batches: `--imported DIR` plus optional `--batch NAME` options."""

from __future__ import annotations

from pathlib import Path

from b2p.errors import B2PError


def parse_batch_names(batch: list[str] | None) -> list[str]:
    """`--batch a --batch b` and `--batch a,b` (what a DVC list interpolates to) mean the same."""
    names: list[str] = []
    for item in batch or []:
        names += [n.strip() for n in str(item).replace(" ", ",").split(",") if n.strip()]
    return list(dict.fromkeys(names))


def resolve_batch_files(imported_dir: str | Path, batch: list[str] | None = None) -> list[Path]:
    """Canonical annotation files of the named batches, or of every batch in `imported_dir` (sorted)."""
    imported_dir = Path(imported_dir)
    names = parse_batch_names(batch)
    if not names:
        files = sorted(imported_dir.glob("*.json"))
        if not files:
            raise B2PError("no imported batches here (run `b2p import` first)", imported_dir)
        return files
    files = []
    for n in names:
        f = imported_dir / f"{n}.json"
        if not f.is_file():
            raise B2PError(f"batch {n!r} was never imported (no {f.name}); run `b2p import --batch {n}` first", imported_dir)
        files.append(f)
    return files


WEIGHTS_DIR_ENV = "B2P_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = "weights"


def weights_dir(explicit: str | Path | None = None) -> Path:
    """The local model-weights folder (SAM and DINOv2 files): the explicit one, else $B2P_WEIGHTS_DIR,
    else `weights/`. Air-gapped sites put the official files here."""
    import os

    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)
