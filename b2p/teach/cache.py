"""On-disk cache of SAM image embeddings, so re-running with other decoder settings skips the encoder.

Key: SHA-256 of the decoded image (its height, width and RGB bytes, so re-encoding a file without changing
its pixels still hits) + SAM model type + the checkpoint's SHA-256. One `.npz` per image at
`<root>/<model_type>/<checkpoint sha[:16]>/<key[:2]>/<key>.npz` holding the 1x256x64x64 float32 embedding
and the sizes SAM needs to decode against it. Files are written atomically; an unreadable file counts as a
miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from b2p.fileio import write_bytes_atomic

DEFAULT_CACHE_DIR = "data/cache/embeddings"
EMBEDDING_SHAPE = (1, 256, 64, 64)  # SAM's image encoder output, every model size


def image_content_hash(image: np.ndarray) -> str:
    """SHA-256 of an HxWx3 uint8 image's shape and pixels."""
    a = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings of one (model type, checkpoint) pair. Counts `hits` and `misses`."""

    def __init__(self, root: str | Path, model_type: str, checkpoint_sha256: str):
        self.root = Path(root)
        self.dir = self.root / model_type / checkpoint_sha256[:16]
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npz"

    def load(self, key: str) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]] | None:
        """(embedding 1xCxhxw float32, input_size (h, w), original_size (H, W)), or None on a miss."""
        p = self.path(key)
        if p.is_file():
            try:
                with np.load(p, allow_pickle=False) as z:
                    out = z["features"], tuple(int(v) for v in z["input_size"]), tuple(int(v) for v in z["original_size"])
                # a file of another shape (truncated, or written by other code) would crash the decoder
                if out[0].shape == EMBEDDING_SHAPE and len(out[1]) == 2 and len(out[2]) == 2:
                    self.hits += 1
                    return out
            except (OSError, ValueError, KeyError, EOFError, TypeError):
                pass  # unreadable or the wrong shape: recompute and overwrite
        self.misses += 1
        return None

    def save(self, key: str, features: np.ndarray, input_size: tuple[int, int], original_size: tuple[int, int]) -> None:
        buf = io.BytesIO()
        np.savez(buf, features=np.asarray(features, np.float32), input_size=np.array(input_size), original_size=np.array(original_size))
        write_bytes_atomic(self.path(key), buf.getvalue())
