"""Binary masks as COCO run-length encoding (pycocotools), with JSON-safe `counts`."""

from __future__ import annotations

import numpy as np


def rle_encode(mask: np.ndarray) -> dict:
    """HxW bool/uint8 mask -> COCO RLE dict with `counts` as str (pycocotools returns bytes)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]}


def rle_decode(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts, or uncompressed list counts) -> HxW bool mask."""
    from pycocotools import mask as mask_utils

    r = dict(rle)
    if isinstance(r["counts"], list):
        r = mask_utils.frPyObjects(r, r["size"][0], r["size"][1])
    elif isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(bool)


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def rle_area(rle: dict) -> int:
    return int(rle_decode(rle).sum())
