"""File primitives every stage shares: atomic writes, safe relative paths, image decoding.

Every output b2p writes goes through `atomic_write`: the bytes land in a temporary file beside the target
and are renamed over it only once complete, so an interrupted run never leaves a half-written file and
never destroys the previous version.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator
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


# OS errors a user can act on (a full disk, a read-only mount, a name too long, missing permissions): every
# writing command turns them into one clear message naming the path (`as_b2p_error`, and b2p.cli for any
# that escape elsewhere). Any other OSError is a bug or a broken system and keeps its traceback.
OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is too large for this file system",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the file name is too long for this file system",
}
KEPT = "nothing was replaced: the earlier output is kept as it was (b2p swaps an output in only once it is complete)"


def as_b2p_error(e: OSError, path: str | Path | None = None, writing: bool = True) -> B2PError | OSError:
    """One of OS_ERRORS as a B2PError naming `path` (else the file the OS named), saying that the earlier
    output was kept; any other OSError is returned unchanged (the caller re-raises it)."""
    if e.errno not in OS_ERRORS:
        return e
    what = OS_ERRORS[e.errno] + f" ({errno.errorcode[e.errno]})"
    hint = "; shorten the image file names or the batch name" if e.errno == errno.ENAMETOOLONG else ""
    return B2PError(f"{'cannot write: ' if writing else ''}{what}{hint}; {KEPT}", path if path is not None else e.filename)


def name_max(folder: str | Path) -> int:
    """The longest file name, in bytes, that the file system holding `folder` (or its nearest existing
    parent) accepts: 255 on most, 143 on eCryptfs; 255 where the platform cannot say."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return 255


def temp_prefix(name: str) -> str:
    """The prefix of a hidden temporary file beside `name`: `.NAME.`, with NAME cut so that the temporary
    name (prefix + 8 random characters + suffix) fits NAME_MAX even when `name` itself nearly fills it."""
    return "." + name.encode()[:TEMP_NAME_KEEP].decode(errors="ignore") + "."


TEMP_NAME_KEEP = 200  # bytes of the target's name kept in a temporary name (255 - 200 leaves room for the rest)


def _mkdir_parents(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise B2PError("cannot create this folder: a file of that name is in the way", folder) from None
    except OSError as e:
        raise as_b2p_error(e, folder) from None


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing that replaces `path` only when the block succeeds.

    The new file keeps the mode of the one it replaces, else gets the process umask's (0644 under 022).
    A full disk, a read-only folder or a name too long becomes one B2PError naming `path` (OS_ERRORS).
    """
    path = Path(path)
    if path.is_dir():
        raise B2PError("is a folder, but a file must be written here; give a file path", path)
    _mkdir_parents(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise as_b2p_error(e, path) from None
    try:
        os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # an error of the write itself (no file named, or the temporary file) is this path's; one the block
        # raised about another file is left to the caller
        if isinstance(e, OSError) and e.filename in (None, tmp, str(path)):
            raise as_b2p_error(e, path) from None
        raise


def clear_stale_stages(target: Path) -> None:
    """Undo what a killed run of an earlier b2p version left beside `target` (one hidden folder per target):
    an old output moved aside for a swap that never finished goes back (the target is missing), and its
    hidden build folders are removed (b2p's names only)."""
    parent = target.parent
    if not parent.is_dir():
        return
    for old in parent.glob(f".{target.name}.*.old"):
        if (old / target.name).is_dir() and not target.exists():
            os.replace(old / target.name, target)
        shutil.rmtree(old, ignore_errors=True)
    for stage in parent.glob(f".{target.name}.*.building"):
        shutil.rmtree(stage, ignore_errors=True)


# --- a set of output folders replaced together ----------------------------------------------------------
#
# `staged_dirs` builds every target of one parent folder inside ONE hidden folder `.b2p-<set>.<random>.building`
# beside them. The commit point is one rename of that folder to `.b2p-<set>.swap` (the journal: a complete new
# set). Then each target is moved aside into `.b2p-<set>.old` and its new version moved in; both folders go.
# A kill before the commit point leaves the old set; after it, the set is still on its way in and the next run
# of any b2p command writing one of these targets finishes the swap first (`recover_staged`), so the set is
# never left half old, half new. `<set>` names the targets (a hash), so runs writing other targets in the
# same parent (seeds side by side) never touch each other's folders; each journal lists its targets in
# SET_MANIFEST.
SET_MANIFEST = ".b2p-set.json"


def _set_names(folder: Path) -> list[str]:
    try:
        names = json.loads((folder / SET_MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _finish_swap(parent: Path, swap: Path) -> None:
    """Move the complete new set of `swap` into place (repeatable: a kill here is finished by the next run)."""
    old = parent / (swap.name.removesuffix(".swap") + ".old")
    for name in _set_names(swap):
        new, target = swap / name, parent / name
        if not new.exists():  # moved in already
            continue
        if target.exists() or target.is_symlink():  # the new one is still in the journal: this one is old
            old.mkdir(exist_ok=True)
            shutil.rmtree(old / name, ignore_errors=True)
            os.replace(target, old / name)
        os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(swap)


def recover_staged(targets: list[Path]) -> None:
    """Finish a swap a killed run left for any of `targets` (its whole set goes in), and remove the hidden
    build folders and moved-aside old folders of sets that include any of them."""
    by_parent: dict[Path, set[str]] = {}
    for t in targets:
        clear_stale_stages(t)
        by_parent.setdefault(t.parent, set()).add(t.name)
    for parent, names in by_parent.items():
        if not parent.is_dir():
            continue
        for swap in sorted(parent.glob(".b2p-*.swap")):
            if names & set(_set_names(swap)):
                _finish_swap(parent, swap)
        for leftover in sorted([*parent.glob(".b2p-*.building"), *parent.glob(".b2p-*.old")]):
            if names & (set(_set_names(leftover)) | {p.name for p in leftover.iterdir()}):
                shutil.rmtree(leftover, ignore_errors=True)


def _in_target(path: Path, builds: dict[Path, Path]) -> Path | None:
    """`path` inside a build folder -> the same path inside its target (None when it is in none)."""
    for parent, build in builds.items():
        try:
            return parent / Path(path).relative_to(build)
        except ValueError:
            continue
    return None


def _set_tag(names: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:12]


@contextlib.contextmanager
def staged_dirs(targets: list[Path]) -> Iterator[list[Path]]:
    """Hidden build folders for `targets` (one each, in the order given); when the block succeeds the targets
    of each parent folder are replaced together, whole; on any error (or a kill) before that the build
    vanishes and every target stays as it was.

    For output folders that must always be one run's output (a kill half-way must never leave new files
    beside old ones, nor one format of an export new and another old). See the comment above for how a kill
    during the swap is finished by the next run.
    """
    targets = [Path(t) for t in targets]
    recover_staged(targets)
    groups: dict[Path, list[Path]] = {}
    for t in targets:
        groups.setdefault(t.parent, []).append(t)
    builds: dict[Path, Path] = {}  # parent -> its build folder
    created = list(dict.fromkeys(p for t in targets for p in [t.parent, *t.parent.parents] if not p.exists()))  # deepest first
    try:
        for parent, group in groups.items():
            _mkdir_parents(parent)
            names = [t.name for t in group]
            try:
                builds[parent] = build = Path(tempfile.mkdtemp(prefix=f".b2p-{_set_tag(names)}.", suffix=".building", dir=parent))
                (build / SET_MANIFEST).write_text(json.dumps(names))
                for t in group:
                    (build / t.name).mkdir()
            except OSError as e:
                raise as_b2p_error(e, parent) from None
        yield [builds[t.parent] / t.name for t in targets]
    except BaseException as e:
        for b in builds.values():
            shutil.rmtree(b, ignore_errors=True)
        for p in created:  # leave no empty output folder behind either
            with contextlib.suppress(OSError):
                p.rmdir()
        named = _in_target(e.path, builds) if isinstance(e, B2PError) and e.path is not None else None
        if named is not None:  # name the output as the user knows it, not its hidden build folder
            raise B2PError(e.problem, named) from None
        raise
    for parent, build in builds.items():
        swap = parent / f".b2p-{_set_tag([t.name for t in groups[parent]])}.swap"
        try:
            os.rename(build, swap)  # the commit point: from here on the new set goes in, now or on the next run
            _finish_swap(parent, swap)
        except OSError as e:
            raise as_b2p_error(e, parent) from None


def check_separate_folders(
    outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None], input_files: Iterable[str | Path] = ()
) -> None:
    """Refuse an output (folder or file) that is, holds or lies inside an input folder or another output, or
    that holds one of `input_files`: writing it would overwrite or delete what the run reads or writes, or
    the next run would read the outputs as inputs. Keys are the options' names (shown in the message); None
    entries are skipped. Call it before anything is read or written. The one such check every command uses."""
    outs = [(n, Path(f)) for n, f in outputs.items() if f is not None]
    ins = [(n, Path(f)) for n, f in inputs.items() if f is not None]
    for i, (a, pa) in enumerate(outs):
        ra = pa.resolve()
        for b, pb in outs[i + 1 :] + ins:
            rb = pb.resolve()
            if ra == rb:
                how = "is the same folder as"
            elif rb in ra.parents:
                how = "lies inside"
            elif ra in rb.parents:
                how = "holds"
            else:
                continue
            raise B2PError(f"{a} {how} {b} ({pb}): writing it would overwrite what this run reads or writes; give {a} a folder of its own", pa)
    if outs:
        resolved = [(a, pa, pa.resolve()) for a, pa in outs]
        for f in input_files:
            rf = Path(f).resolve()
            for a, pa, ra in resolved:
                if ra in rf.parents or ra == rf:
                    raise B2PError(f"{a} holds the input file {f}: the outputs would overwrite or mix with the inputs; write them elsewhere", pa)


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
    # checked on the name as written, not on where a symlink points: an image symlinked from elsewhere (DVC's
    # cache.type symlink, a shared store) is inside the folder; only '..' in the name itself leaves it
    norm = os.path.normpath(relative.replace("\\", "/"))
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
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


# EXIF orientation: how a viewer must turn the stored pixels to show the image upright (1 = as stored).
# b2p reads every image as displayed, orientation applied, as browsers, phones and most annotation tools
# show it, so boxes drawn on the displayed image land on the right pixels. Boxes made on the raw pixels
# (PIL, labelImg, many scripts) do not: the importer warns about every oriented image it meets.
ORIENTATIONS = {
    1: "upright",
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "mirrored left-right, then rotated 90 degrees counter-clockwise",
    6: "rotated 90 degrees clockwise",
    7: "mirrored left-right, then rotated 90 degrees clockwise",
    8: "rotated 90 degrees counter-clockwise",
}


def _png_exif_chunk(path: Path) -> bytes | None:
    """The payload of a PNG's eXIf chunk, walking the chunk headers only (no pixel decoding)."""
    with open(path, "rb") as f:
        f.seek(8)
        while len(header := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return None


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation (1..8) `read_image` applies to this file; 1 when it has none.

    Read from the header only, so it is cheap next to decoding. In a PNG only the eXIf chunk counts, as for
    OpenCV and browsers (not ImageMagick's older 'Raw profile type exif' text, which Pillow also reads).
    """
    from PIL import Image

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read
            with Image.open(path) as im:
                if im.format == "PNG":
                    exif = Image.Exif()
                    if (chunk := _png_exif_chunk(path)) is not None:
                        exif.load(chunk)
                else:
                    exif = im.getexif()
        value = exif.get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError):
        return 1  # unreadable here: read_image names the file when it cannot decode it
    return value if isinstance(value, int) and value in ORIENTATIONS else 1  # OpenCV ignores other values


def describe_orientation(orientation: int) -> str:
    """'EXIF orientation 6 (rotated 90 degrees clockwise)': the words every message about a tag uses."""
    return f"EXIF orientation {orientation} ({ORIENTATIONS.get(orientation, 'unknown')})"


def describe_size_mismatch(
    path: str | Path, declared_wh: tuple[int | None, int | None], actual_wh: tuple[int, int], name: str | None = None
) -> str:
    """The problem text for image `name` (default: the file name) whose decoded size (`read_image`, orientation
    applied) differs from the size its annotations declare.

    When the declared size is the decoded one turned by 90 degrees and the file carries such an orientation,
    the text says so and what to do: the declaration, and likely its boxes, were made on the raw pixels.
    """
    (dw, dh), (w, h) = declared_wh, actual_wh
    text = f"image {name or Path(path).name!r} is declared {dw}x{dh} but the file is {w}x{h}"
    orientation = exif_orientation(path) if (dw, dh) == (h, w) else 1
    if orientation >= 5:
        text += (
            f": its {describe_orientation(orientation)} turns the stored {h}x{w} pixels, and b2p reads images as "
            f"displayed. If the boxes were drawn on the displayed image, declare {w}x{h}; if on the raw "
            "pixels, remove the tag (exiftool -Orientation=1 -n FILE)"
        )
    return text


# Bit depth: b2p works on 8-bit images. A 16-bit file usually holds 10-, 12- or 14-bit sensor data that only
# its maker knows the range of, so no fixed rule converts it right (OpenCV's /256 makes 12-bit data nearly
# black) and a per-image max would change intensities from one image to the next. Such files are refused.
def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file as HxWx3 uint8 RGB, as displayed (EXIF orientation applied, see ORIENTATIONS).

    Grey, palette, RGBA (alpha dropped) and CMYK files are converted to RGB; a file of more than 8 bits per
    channel or one that does not decode raises a B2PError naming it.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise B2PError("image file not found", path)
    data = np.fromfile(path, dtype=np.uint8)
    # ANYDEPTH keeps 16-bit samples so they can be refused; 8-bit files decode exactly as with IMREAD_COLOR
    # alone, orientation included
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if img is None and data.size:
        # a 1-channel float TIFF decodes only unchanged: look, to say why it is refused
        deep = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if deep is not None and deep.dtype != np.uint8:
            raise B2PError(_deep_image_message(deep), path)
    if img is None:
        raise B2PError("image file could not be decoded (corrupt or not an image)", path)
    if img.dtype != np.uint8:
        raise B2PError(_deep_image_message(img), path)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _deep_image_message(img: np.ndarray) -> str:
    kind = "floating-point" if np.issubdtype(img.dtype, np.floating) else "integer"
    top = img.max() if img.size else 0
    return (
        f"image has {img.dtype.itemsize * 8}-bit {kind} samples (largest value {top:g}); b2p reads 8-bit images "
        "only and does not guess the real bit depth: convert every image to 8-bit with one fixed scale, the "
        "same for all, from the data's real bit depth (12-bit data: value * 255 / 4095, rounded)"
    )


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file as displayed, decoding it fully so a corrupt or 16-bit file is caught here.

    Compare it with a declared size through `describe_size_mismatch`, which names an EXIF orientation.
    """
    img = read_image(path)
    return img.shape[1], img.shape[0]


def encode_png(array: np.ndarray, path: str | Path | None = None) -> bytes:
    """The PNG bytes of a uint8 array (HxW or HxWx3 RGB); `path` only names the file in an error."""
    import cv2

    arr = np.asarray(array)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise B2PError("could not encode PNG", path)
    return buf.tobytes()


def write_png_atomic(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array (HxW or HxWx3 RGB) as PNG, atomically."""
    write_bytes_atomic(path, encode_png(array, path))
