"""The image <-> model geometry of the student: sizes, padding, labels, boxes, logits and tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from b2p.errors import B2PError
from b2p.student.geometry import IGNORE, Geometry


def test_for_image_scale_and_max_side_never_upscale_unless_asked():
    g = Geometry.for_image(632, 222)
    assert (g.scale, g.scaled_size, g.padded_size()) == (1.0, (632, 222), (640, 224))
    assert Geometry.for_image(4000, 3000, max_side=1000).scaled_size == (1000, 750)
    assert Geometry.for_image(100, 80, max_side=1000).scaled_size == (100, 80)  # a cap never grows
    assert Geometry.for_image(100, 80, scale=2.0).scaled_size == (200, 160)
    assert Geometry.for_image(4000, 3000, scale=0.5, max_side=1000).scaled_size == (1000, 750)  # the cap binds
    assert Geometry.for_image(100, 80, scale=0.5, max_side=1000).scaled_size == (50, 40)
    assert Geometry.for_image(60, 40, multiple=14).padded_size(min_side=56) == (70, 56)
    with pytest.raises(B2PError):
        Geometry.for_image(10, 10, scale=0)


@pytest.mark.parametrize("h, w, tile", [(40, 90, 64), (150, 70, 64), (64, 64, 64), (200, 300, 96)])
def test_image_and_labels_at_native_scale_round_trip_exactly(h, w, tile):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lab = rng.integers(0, 3, (h, w)).astype(np.uint8)
    g = Geometry.for_image(h, w)
    x, valid = g.image_to_model(img, min_side=tile)
    y = g.labels_to_model(lab, min_side=tile)
    hp, wp = g.padded_size(tile)
    assert x.shape == (hp, wp, 3) and valid.shape == y.shape == (hp, wp)
    assert hp >= max(h, tile) and wp >= max(w, tile) and hp % 32 == 0 and wp % 32 == 0
    assert np.array_equal(x[:h, :w], img) and not x[h:].any() and not x[:, w:].any()  # padded, not stretched
    assert valid.sum() == h * w and valid[:h, :w].all()
    assert np.array_equal(y[:h, :w], lab) and (y[~valid] == IGNORE).all()
    assert np.array_equal(g.mask_to_image(y), lab)


def test_shrinking_keeps_a_one_pixel_line_and_does_not_fatten_blobs():
    lab = np.zeros((120, 90), np.uint8)
    lab[37, 5:80] = 2  # a 1-px crack, class 2
    lab[:, 61] = 1  # a 1-px vertical line, class 1
    lab[80:110, 10:40] = 1  # a 30x30 blob
    for scale in (0.5, 1 / 3, 0.37):
        g = Geometry.for_image(120, 90, scale=scale)
        y = g.labels_to_model(lab)
        sy, sx = g.factors
        row = int(37 * sy)
        assert (y[row - 1 : row + 2, int(10 * sx) : int(55 * sx)] == 2).any(0).all(), scale  # unbroken, class kept
        assert (y[: int(30 * sy), int(61 * sx) - 1 : int(61 * sx) + 2] == 1).any(1).all(), scale
        blob = (y == 1)[int(75 * sy) : int(115 * sy), : int(50 * sx)].sum()
        assert abs(blob - 900 * sx * sy) <= 4 * 30 * sx, (scale, blob)  # about the true area: no halo


def test_upscaling_labels_is_nearest_and_logits_map_back():
    lab = np.zeros((20, 30), np.uint8)
    lab[5:10, 3:9] = 1
    g = Geometry.for_image(20, 30, scale=2.0)
    y = g.labels_to_model(lab)
    assert y.shape == (64, 64) and (y[:40, :60] >= 0).all() and (y[40:] == IGNORE).all()
    assert np.array_equal(g.mask_to_image(y), lab)
    # logits built from the model-space one-hot map come back to the image's own size and classes
    logits = np.stack([(y == 0), (y == 1)]).astype(np.float32)
    back = g.logits_to_image(logits)
    assert back.shape == (2, 20, 30) and back.dtype == np.float32
    assert np.array_equal(back.argmax(0), lab)
    assert g.logits_to_image(logits[None]).shape == (1, 2, 20, 30)


@pytest.mark.parametrize("src, dst", [((30, 40), (45, 60)), ((300, 400), (200, 270)), ((7, 9), (40, 33)), ((64, 64), (64, 65))])
def test_resize_bilinear_is_torch_bilinear_interpolation(src, dst):
    from b2p.student.geometry import resize_bilinear

    x = torch.randn(3, *src, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.interpolate(x[None], size=dst, mode="bilinear", align_corners=False)[0].numpy()
    got = resize_bilinear(x.numpy(), dst)
    assert got.shape == (3, *dst) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("h, w, scale", [(100, 60, 1.0), (100, 60, 0.5), (333, 517, 0.3), (50, 70, 1.7)])
def test_boxes_and_box_masks_round_trip(h, w, scale):
    boxes = np.array([[10, 20, 30, 40], [0, 0, 1, 1], [w - 5, h - 3, w, h], [12.5, 7.2, 13.1, 40]], dtype=np.float64)
    g = Geometry.for_image(h, w, scale=scale)
    mb = g.boxes_to_model(boxes)
    sy, sx = g.factors
    np.testing.assert_allclose(mb / [sx, sy, sx, sy], boxes)  # back to image pixels exactly
    m = g.box_mask_to_model(boxes, min_side=64)
    hs, ws = g.scaled_size
    assert m.shape == g.padded_size(64) and not m[hs:].any() and not m[:, ws:].any()
    for b in mb:  # every box, even a sub-pixel one at scale < 1, keeps at least one pixel
        x0, y0 = int(np.floor(b[0])), int(np.floor(b[1]))
        assert m[min(y0, hs - 1), min(x0, ws - 1)]
    if scale == 1.0:
        from b2p.boxes import box_mask

        want = np.zeros((h, w), bool)
        for b in boxes:
            want |= box_mask(b, (h, w))
        assert np.array_equal(m[:h, :w], want)
    # a box mask mapped back to the image covers the original box pixels
    back = g.mask_to_image(m)
    assert back[25, 15] and back.shape == (h, w)


def test_image_to_model_shrinks_with_area_filter():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, ::2] = 255  # 1-px stripes: an area filter averages them to grey, bilinear would alias
    x, valid = Geometry.for_image(64, 64, scale=0.5).image_to_model(img)
    assert x.shape == (32, 32, 3) and valid.all()
    assert np.abs(x.astype(int) - 128).max() <= 1


def test_tile_origins_cover_the_padded_image_on_the_stride_grid():
    g = Geometry.for_image(300, 130)  # padded 320 x 160
    origins = g.tile_origins(96, overlap=24)
    hp, wp = g.padded_size(96)
    cover = np.zeros((hp, wp), int)
    for y, x in origins:
        assert y % 32 == 0 and x % 32 == 0 and y + 96 <= hp and x + 96 <= wp
        cover[y : y + 96, x : x + 96] += 1
    assert (cover >= 1).all()
    assert {y for y, _ in origins} == {0, 64, 128, 192, 224}
    small = Geometry.for_image(40, 20)
    assert small.tile_origins(64) == [(0, 0)] and small.padded_size(64) == (64, 64)
    with pytest.raises(B2PError):
        g.tile_origins(100)  # not a multiple of the stride
    with pytest.raises(B2PError):
        g.tile_origins(96, overlap=96)



def test_edge_distance_counts_to_the_nearer_image_edge_and_follows_flips():
    g = Geometry.for_image(100, 50, scale=0.5)  # 50 x 25 model px, padded to 64 x 64
    rows, cols = g.edge_distance(min_side=64)
    assert rows.shape == (64,) and cols.shape == (64,)
    assert rows[:3].tolist() == [0, 1, 2] and rows[47:50].tolist() == [2, 1, 0] and rows[24] == 24
    assert (rows[50:] == 0).all() and (cols[25:] == 0).all()  # padding
    assert cols[12] == 12 and cols[24] == 0
    # a flipped view (padding then at the top / left): its rows are the plain view's, reversed
    fr, fc = g.edge_distance(min_side=64, flip=2)
    assert np.array_equal(fr, rows[::-1]) and np.array_equal(fc, cols)
    fr, fc = g.edge_distance(min_side=64, flip=3)
    assert np.array_equal(fr, rows[::-1]) and np.array_equal(fc, cols[::-1])
