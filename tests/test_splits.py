"""The split rule: hash-stable splits and the calibration share."""

from __future__ import annotations

import pytest

from b2p.errors import B2PError
from b2p.splits import SplitRule


def test_calib_never_overlaps_test_and_is_stable():
    names = [f"img_{i:04d}.png" for i in range(2000)]
    rule = SplitRule(val=0.15, test=0.15, calib=0.3)
    split = {n: rule.split_of("b1", n, True) for n in names}
    assert set(split.values()) == {"test", "calib"}  # manual masks: test by default, a share to calib
    calib = {n for n, s in split.items() if s == "calib"}
    test = {n for n, s in split.items() if s == "test"}
    assert not calib & test
    # a hash-test image is never calib, whatever the share
    for share in (0.3, 0.7, 1.0):
        r = SplitRule(val=0.15, test=0.15, calib=share)
        assert not any(r.is_calib("b1", n) for n in names if r.hash_split("b1", n) == "test")
    # about 30 % of the images outside the hashed test split
    eligible = [n for n in names if rule.hash_split("b1", n) != "test"]
    assert abs(len(calib) / len(eligible) - 0.3) < 0.05
    # a larger share keeps every calib image in calib (it only adds); images without a mask are unaffected
    bigger = SplitRule(val=0.15, test=0.15, calib=0.5)
    assert calib <= {n for n in names if bigger.split_of("b1", n, True) == "calib"}
    assert all(rule.split_of("b1", n, False) == SplitRule(val=0.15, test=0.15).split_of("b1", n, False) for n in names)
    # hash mode: calib first, the rest by the hash
    hashed = SplitRule(val=0.15, test=0.15, calib=0.3, manual_masks="hash")
    assert {n for n in names if hashed.split_of("b1", n, True) == "calib"} == calib
    assert all(hashed.split_of("b1", n, True) == "test" for n in test if rule.hash_split("b1", n) == "test")
    # without calib: as before
    assert SplitRule().info() == {"val": 0.15, "test": 0.15, "salt": "b2p", "manual_masks": "test"}
    assert rule.info()["calib"] == 0.3
    with pytest.raises(B2PError):
        SplitRule(calib=1.5)
