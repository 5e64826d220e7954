"""The split rule: the one place that decides whether an image is train, val or test.

An image's split depends only on its identity (batch name and relative file name) and the fractions,
through a hash, so adding a batch never moves an existing image to another split, and the same input
gives the same split on every machine. Images that come with a manual mask go to the test split by
default: manual masks are for scoring, and a scored image must never be trained on.

Calibration split: a share `calib` of the manually masked images goes to `calib` instead: their masks
choose settings (`b2p teach --teacher auto`, `b2p finalize`), they are never trained on and never in
the test scores. The choice is a second hash, independent of the split hash, and only images that the
split hash does not put in test are eligible: the test set never shrinks when calib is asked for, and
`b2p masks-to-boxes --calib F` keeps the manual masks of exactly the images `b2p import` (same F) will
put in calib. calib 0 (the default) gives the splits of before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from b2p.errors import B2PError

SPLITS = ("train", "val", "test", "calib")


@dataclass(frozen=True)
class SplitRule:
    """Hash-based split. `val` and `test` are fractions of the images without a forced split."""

    val: float = 0.15
    test: float = 0.15
    salt: str = "b2p"
    # where images with a manual mask go: "test" (default) or "hash" (same rule as the others)
    manual_masks: str = "test"
    # share of the manually masked images (outside the hashed test split) that go to `calib`
    calib: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.val <= 1 and 0 <= self.test <= 1 and self.val + self.test <= 1):
            raise B2PError(f"split fractions must be in [0, 1] and sum to at most 1 (val={self.val}, test={self.test})")
        if self.manual_masks not in ("test", "hash"):
            raise B2PError(f"manual_masks split must be 'test' or 'hash', got {self.manual_masks!r}")
        if not 0 <= self.calib <= 1:
            raise B2PError(f"calib fraction must be in [0, 1], got {self.calib}")

    def hash_split(self, batch: str, file_name: str) -> str:
        u = unit_hash(f"{self.salt}:{batch}/{file_name}")
        if u < self.test:
            return "test"
        if u < self.test + self.val:
            return "val"
        return "train"

    def is_calib(self, batch: str, file_name: str) -> bool:
        """Whether a manually masked image is a calibration image (see the module docstring)."""
        if self.calib <= 0 or self.hash_split(batch, file_name) == "test":
            return False
        return unit_hash(f"{self.salt}:calib:{batch}/{file_name}") < self.calib

    def split_of(self, batch: str, file_name: str, has_manual_mask: bool) -> str:
        if has_manual_mask and self.is_calib(batch, file_name):
            return "calib"
        if has_manual_mask and self.manual_masks == "test":
            return "test"
        return self.hash_split(batch, file_name)

    def info(self) -> dict:
        """The rule as recorded in an imported file (calib only when used, so older files compare equal)."""
        d = {"val": self.val, "test": self.test, "salt": self.salt, "manual_masks": self.manual_masks}
        if self.calib:
            d["calib"] = self.calib
        return d


def parse_splits(text: str) -> tuple[str, ...]:
    """`all` or a comma-separated list of SPLITS ("calib,test") -> the splits, in SPLITS order."""
    if text.strip() == "all":
        return SPLITS
    asked = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in asked if t not in SPLITS]
    if not asked or bad:
        raise B2PError(f"split must be all or a comma-separated list of {list(SPLITS)}, got {text!r}")
    return tuple(sp for sp in SPLITS if sp in asked)


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) from text (SHA-1; Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64
