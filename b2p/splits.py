"""The split rule: the one place that decides whether an image is train, val or test.

An image's split depends only on its identity (batch name and relative file name) and the fractions,
through a hash, so adding a batch never moves an existing image to another split, and the same input
gives the same split on every machine. Images that come with a manual mask go to the test split by
default: manual masks are for scoring, and a scored image must never be trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from b2p.errors import B2PError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitRule:
    """Hash-based split. `val` and `test` are fractions of the images without a forced split."""

    val: float = 0.15
    test: float = 0.15
    salt: str = "b2p"
    # where images with a manual mask go: "test" (default) or "hash" (same rule as the others)
    manual_masks: str = "test"

    def __post_init__(self) -> None:
        if not (0 <= self.val <= 1 and 0 <= self.test <= 1 and self.val + self.test <= 1):
            raise B2PError(f"split fractions must be in [0, 1] and sum to at most 1 (val={self.val}, test={self.test})")
        if self.manual_masks not in ("test", "hash"):
            raise B2PError(f"manual_masks split must be 'test' or 'hash', got {self.manual_masks!r}")

    def hash_split(self, batch: str, file_name: str) -> str:
        u = unit_hash(f"{self.salt}:{batch}/{file_name}")
        if u < self.test:
            return "test"
        if u < self.test + self.val:
            return "val"
        return "train"

    def split_of(self, batch: str, file_name: str, has_manual_mask: bool) -> str:
        if has_manual_mask and self.manual_masks == "test":
            return "test"
        return self.hash_split(batch, file_name)


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) from text (SHA-1; Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64
