"""File primitives every stage shares: atomic writes, safe relative paths, image decoding.

Every output b2p writes goes through `atomic_write`: the bytes land in a temporary file beside the target
and are renamed over it only once complete, so an interrupted run never leaves a half-written file and
never destroys the previous version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from b2p.errors import B2PError


def current_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it is read by setting and restoring it
    (POSIX has no read-only call), which is brief but not thread-safe, hence the /proc path first."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: Path) -> int:
    """Permission bits an output gets: those of the file it replaces, else 0666 minus the umask (what
    `open()` would give). mkstemp makes 0600 files, which a team sharing a project folder cannot read."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~current_umask()


def make_dir_like_mkdir(path: Path) -> None:
    """Give a folder made by `tempfile.mkdtemp` (0700) the mode `mkdir` would have given it."""
    os.chmod(path, 0o777 & ~current_umask())


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing that replaces `path` only when the block succeeds.

    The new file keeps the mode of the one it replaces, else gets the process umask's (0644 under 022).
    """
    path = Path(path)
    if path.is_dir():
        raise B2PError("is a folder, but a file must be written here; give a file path", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise B2PError("cannot create this folder: a file of that name is in the way", path.parent) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode())


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing file or a syntax error into a B2PError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise B2PError(f"{what} not found", path)
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise B2PError(f"{what} is not UTF-8 text", path) from None
    except json.JSONDecodeError as e:
        raise B2PError(f"{what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path) from None
    except ValueError as e:  # an integer over Python's digit limit (sys.set_int_max_str_digits)
        raise B2PError(f"{what} holds a number too long to read ({str(e).split(';')[0]})", path) from None
    except RecursionError:
        raise B2PError(f"{what} is nested too deeply to read (corrupt or not an annotation file)", path) from None


def safe_join(root: str | Path, relative: str, what: str = "path") -> Path:
    """Join `relative` under `root`, refusing absolute paths and anything that escapes `root` (`../`)."""
    root = Path(root)
    rel = Path(relative)
    if not relative or rel.is_absolute() or relative.startswith(("/", "\\")):
        raise B2PError(f"{what} {relative!r} must be a relative path inside {root}")
    if "\x00" in relative:  # os calls raise ValueError on it
        raise B2PError(f"{what} {relative!r} holds a NUL byte")
    try:
        resolved_root = root.resolve()
        resolved = (root / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise B2PError(f"{what} {relative!r} cannot be resolved inside {root}: {e}") from None
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise B2PError(f"{what} {relative!r} escapes the folder {root}")
    return root / rel


def normalize_file_name(name: str) -> str:
    """The one spelling of an image's relative file name: '/'-separated, no `.` or empty parts.

    `./a.png`, `a//b.png` and `a\\b.png` name the same file as `a.png` / `a/b.png`; without this the
    duplicate check passes them and one image lands in two splits. Refuses NUL bytes, absolute paths
    and names leaving the image folder (the problem only: callers add the file at fault).
    """
    if "\x00" in name:
        raise B2PError(f"image file name {name!r} holds a NUL byte")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or norm in (".", ""):
        raise B2PError(f"image file name {name!r} must be a relative path inside the image folder")
    if norm == ".." or norm.startswith("../"):
        raise B2PError(f"image file name {name!r} escapes the image folder")
    return norm


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file as HxWx3 uint8 RGB (grayscale is replicated), or raise a B2PError naming it."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise B2PError("image file not found", path)
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise B2PError("image file could not be decoded (corrupt or not an image)", path)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, decoding it fully so a corrupt file is caught here."""
    img = read_image(path)
    return img.shape[1], img.shape[0]


def write_png_atomic(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array (HxW or HxWx3 RGB) as PNG, atomically."""
    import cv2

    arr = np.asarray(array)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise B2PError("could not encode PNG", path)
    write_bytes_atomic(path, buf.tobytes())
