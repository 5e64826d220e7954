"""SAM checkpoints: where they come from, how they are found, verified, downloaded and loaded.

Lookup order for `--sam-model TYPE`:
  1. an explicit `--checkpoint FILE` (any SAM state dict of that size, e.g. a fine-tuned one; its hash is
     recorded, not compared with the official one);
  2. the official file name in the local weights folder (`--weights-dir`, else `$B2P_WEIGHTS_DIR`, else
     `weights/`), which must match the official checksum;
  3. a download from the official host (or the mirror in $B2P_SAM_BASE_URL) into that folder (unless downloads are off): resumable through an
     HTTP Range request into `<name>.part`, checksum verified, then renamed into place atomically.

Checksums: the hex suffix of an official file name (`sam_vit_b_01ec64.pth` -> `01ec64`) is the start of the
file's SHA-256 (the torch.hub convention). That prefix is all we know for certain, so it is all we check.

Loading never unpickles arbitrary code: `torch.load(weights_only=True)`. The model size is read from the
state dict's shapes (encoder embedding width and block count), so a ViT-B file given as ViT-L is refused
with a message saying what it really is.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.project import WEIGHTS_DIR_ENV, weights_dir
from b2p.fileio import sha256_file

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
MIRROR_ENV = "B2P_SAM_BASE_URL"  # a site mirror of the official folder (same file names and checksums)


@dataclass(frozen=True)
class ModelSize:
    """Image-encoder architecture of one SAM size (the prompt encoder and mask decoder are shared)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    official: bool = True


# The three official sizes (segment_anything/build_sam.py) plus one tiny size that exists only so tests
# run in seconds. It is NOT an official SAM model; no pretrained weights exist for it.
MODEL_SIZES: dict[str, ModelSize] = {
    "vit_b": ModelSize(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ModelSize(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ModelSize(1280, 32, 16, (7, 15, 23, 31)),
    "test_tiny": ModelSize(32, 2, 2, (1,), official=False),
}
OFFICIAL_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")


@dataclass(frozen=True)
class CheckpointSpec:
    """An official checkpoint: its file name, where to download it and the known start of its SHA-256."""

    model_type: str
    file_name: str
    url: str
    sha256_prefix: str


def _official(model_type: str, file_name: str) -> CheckpointSpec:
    prefix = re.search(r"_([0-9a-f]+)\.pth$", file_name).group(1)
    return CheckpointSpec(model_type, file_name, OFFICIAL_BASE_URL + file_name, prefix)


SAM_CHECKPOINTS: dict[str, CheckpointSpec] = {
    "vit_b": _official("vit_b", "sam_vit_b_01ec64.pth"),
    "vit_l": _official("vit_l", "sam_vit_l_0b3195.pth"),
    "vit_h": _official("vit_h", "sam_vit_h_4b8939.pth"),
}


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint file chosen for a run, with its full SHA-256 and how it was found."""

    model_type: str
    path: Path
    sha256: str
    source: str  # "checkpoint option", "weights folder" or "downloaded from URL"


def check_model_type(model_type: str) -> None:
    if model_type not in MODEL_SIZES:
        raise B2PError(f"unknown SAM model {model_type!r}; choose one of {', '.join(OFFICIAL_MODEL_TYPES)}")


def resolve_checkpoint(
    model_type: str,
    checkpoint: str | Path | None = None,
    weights_folder: str | Path | None = None,
    download: bool = True,
    specs: Mapping[str, CheckpointSpec] | None = None,
    progress: bool = True,
) -> ResolvedCheckpoint:
    """Find (or download) the checkpoint file for `model_type`; see the module docstring for the order.

    `specs` overrides the official URL/hash table (tests serve files from a local HTTP server).
    """
    check_model_type(model_type)
    specs = SAM_CHECKPOINTS if specs is None else specs
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise B2PError("checkpoint file not found", path)
        return ResolvedCheckpoint(model_type, path, sha256_file(path), "checkpoint option")
    spec = specs.get(model_type)
    if spec is None:
        raise B2PError(f"model {model_type!r} has no official checkpoint; pass --checkpoint FILE")
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and specs is SAM_CHECKPOINTS:
        spec = dataclasses.replace(spec, url=mirror.rstrip("/") + "/" + spec.file_name)
    folder = weights_dir(weights_folder)
    path = folder / spec.file_name
    if path.is_file():
        digest = sha256_file(path)
        if not digest.startswith(spec.sha256_prefix):
            raise B2PError(
                f"checksum mismatch: SHA-256 {digest[:12]}... does not start with {spec.sha256_prefix} as the "
                f"official {spec.file_name} does (corrupt or incomplete file?); delete it and download it again "
                f"from {spec.url}",
                path,
            )
        return ResolvedCheckpoint(model_type, path, digest, "weights folder")
    if not download:
        raise B2PError(_place_it_message(spec, folder, "downloads are switched off (--no-download)"))
    digest = download_checkpoint(spec, path, progress=progress)
    return ResolvedCheckpoint(model_type, path, digest, f"downloaded from {spec.url}")


def _place_it_message(spec: CheckpointSpec, folder: Path, why: str) -> str:
    return (
        f"SAM {spec.model_type} checkpoint not found and {why}. Download {spec.url} on a machine with internet "
        f"access and place it as {folder / spec.file_name} (or point --weights-dir / ${WEIGHTS_DIR_ENV} at the "
        f"folder holding {spec.file_name}, or pass --checkpoint FILE)"
    )


def download_checkpoint(spec: CheckpointSpec, dest: str | Path, progress: bool = True, chunk: int = 1 << 20) -> str:
    """Download `spec.url` to `dest`; return the file's SHA-256.

    Bytes go to `<dest>.part`; a later call continues from its size with an HTTP Range request (a server
    that ignores Range sends the whole file, which restarts the part file). Only a file whose SHA-256
    starts with `spec.sha256_prefix` is renamed to `dest`; a mismatch deletes the part file and raises.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(spec.url, headers={"User-Agent": "b2p"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        resp = urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the part file already holds every byte
            resp = None
        else:
            raise B2PError(_place_it_message(spec, dest.parent, f"the download failed (HTTP {e.code} {e.reason})")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise B2PError(_place_it_message(spec, dest.parent, f"the download failed ({reason}); are you offline?")) from None

    if resp is not None:
        with resp:
            if start and resp.status != 206:
                start = 0  # server ignored the Range header: start over
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            mode = "ab" if start else "wb"
            try:
                with open(part, mode) as f, _progress_bar(progress, spec.file_name, total, start) as advance:
                    while block := resp.read(chunk):
                        f.write(block)
                        advance(len(block))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise B2PError(
                    f"download of {spec.url} was interrupted ({e}); run again to resume from "
                    f"{part.stat().st_size if part.exists() else 0} bytes",
                    part,
                ) from None
            if total is not None and part.stat().st_size < total:
                raise B2PError(
                    f"download of {spec.url} stopped at {part.stat().st_size} of {total} bytes; run again to resume",
                    part,
                )
    digest = sha256_file(part)
    if not digest.startswith(spec.sha256_prefix):
        part.unlink(missing_ok=True)
        raise B2PError(
            f"downloaded file failed the checksum: SHA-256 {digest[:12]}... does not start with "
            f"{spec.sha256_prefix}; it was deleted, nothing was installed",
            dest,
        )
    os.replace(part, dest)
    return digest


class _progress_bar:
    """A rich download bar (bytes), or a no-op when `enabled` is false."""

    def __init__(self, enabled: bool, name: str, total: int | None, done: int):
        self.enabled, self.name, self.total, self.done = enabled, name, total, done

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.p = Progress(
            TextColumn("[bold]download[/] {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        self.p.__enter__()
        task = self.p.add_task(self.name, total=self.total, completed=self.done)
        return partial(self.p.advance, task)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False


# --- loading ---------------------------------------------------------------------------------------------


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint's state dict with `weights_only=True` (no arbitrary code), or raise a B2PError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise B2PError("checkpoint file not found", path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler fails on junk bytes with almost any error (IndexError, KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise B2PError(f"checkpoint could not be read (corrupt, truncated or not a PyTorch state dict): {first}", path) from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # some training scripts wrap the state dict
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise B2PError(f"checkpoint holds a {type(sd).__name__}, not a SAM state dict", path)
    return sd


def detect_model_type(state_dict: Mapping[str, Any]) -> str | None:
    """SAM size of a state dict from its image-encoder shapes (embedding width, block count), or None."""
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is None or getattr(w, "ndim", 0) != 4:
        return None
    embed = int(w.shape[0])
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    for name, size in MODEL_SIZES.items():
        if size.embed_dim == embed and size.depth == depth:
            return name
    return None


def _describe(state_dict: Mapping[str, Any]) -> str:
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    width = int(w.shape[0]) if w is not None and getattr(w, "ndim", 0) == 4 else "?"
    return f"encoder width {width}, {len(blocks)} blocks"


def build_sam(model_type: str):
    """A SAM model of `model_type` with random weights, built by segment_anything's own builder."""
    check_model_type(model_type)
    from segment_anything.build_sam import _build_sam, sam_model_registry

    if MODEL_SIZES[model_type].official:
        return sam_model_registry[model_type]()
    s = MODEL_SIZES[model_type]
    return _build_sam(
        encoder_embed_dim=s.embed_dim,
        encoder_depth=s.depth,
        encoder_num_heads=s.num_heads,
        encoder_global_attn_indexes=list(s.global_attn_indexes),
    )


def load_sam(model_type: str, path: str | Path):
    """Build SAM `model_type` and load the checkpoint at `path` into it (strict), in eval mode on the CPU.

    Raises a B2PError for a missing/corrupt file, a file of another size (naming the size it is), or a
    state dict that does not fit the architecture.
    """
    check_model_type(model_type)
    sd = load_state_dict(path)
    if "image_encoder.patch_embed.proj.weight" not in sd:
        raise B2PError("checkpoint is not a SAM state dict (no image_encoder.patch_embed.proj.weight)", path)
    actual = detect_model_type(sd)
    if actual != model_type:
        what = f"a {actual} checkpoint" if actual else f"a SAM checkpoint of no known size ({_describe(sd)})"
        hint = f"; use --sam-model {actual}" if actual in OFFICIAL_MODEL_TYPES else ""
        raise B2PError(f"checkpoint is {what}, not {model_type} ({_describe(sd)}){hint}", path)
    model = build_sam(model_type)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise B2PError(f"checkpoint does not fit SAM {model_type}: {' '.join(first[:3])[:400]}", path) from None
    return model.eval()


def save_random_checkpoint(model_type: str, path: str | Path, seed: int = 0) -> Path:
    """Save a RANDOM-weight SAM of `model_type` exactly as the official files are stored (a plain
    `torch.save`d state dict). For tests and benchmarks only: these weights are not pretrained."""
    import torch

    from b2p.fileio import atomic_write

    torch.manual_seed(seed)
    model = build_sam(model_type)
    with atomic_write(path) as f:
        torch.save(model.state_dict(), f)
    return Path(path)
