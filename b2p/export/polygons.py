"""Binary masks as single polygons that rasterise back close to the mask, holes and separate parts included.

COCO polygons and YOLO-seg lines have no way to say "hole" or "this instance has three parts" except by
the outline itself. The rule used here: every boundary ring of the mask (the outer ring of each part and
the ring of each hole) is traced with the mask on the same side (outer rings one way round, holes the
other), and the rings are joined into ONE closed polygon by zero-width cuts: from a vertex of one ring to
the nearest vertex of another and back along the same segment. The rings are joined along a minimum
spanning tree of their closest-vertex distances, so the cuts are as short as they can be. A cut is
traversed once in each direction, so it adds no area under either fill rule (even-odd or non-zero);
rasterisers that also paint the outline (OpenCV `fillPoly`, used by Ultralytics) paint the pixels a cut
crosses, which is the only difference from the mask (measured by `export` and in the tests).

Two vertex conventions, one per consumer:
- `pixel_centre_rings`: vertices at the centres of the mask's boundary pixels (OpenCV contours). Painted
  with the outline included (`fillPoly`), they reproduce the mask exactly, 1 px wide cracks included; the
  YOLO-seg export uses them, written as (x + 0.5) / W so that scaling back and truncating to int (what
  Ultralytics does) lands on the pixel.
- `pixel_edge_rings`: vertices on the pixel corners, along the edges between mask and background pixels.
  Rasterisers that take a pixel when its centre is inside the polygon (pycocotools) reproduce the mask
  exactly from these; the COCO polygon export uses them.
"""

from __future__ import annotations

import numpy as np


def _crop(mask: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if not rows.size:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return m[y0:y1, x0:x1], int(x0), int(y0)


def pixel_centre_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Boundary rings through the centres of boundary pixels: a list of Nx2 float64 (x, y) arrays, in pixels.

    Outer rings and hole rings run in opposite directions (OpenCV's two-level contour tree). Straight runs
    are compressed to their end points, which changes nothing once the outline is drawn.
    """
    import cv2

    c = _crop(mask)
    if c is None:
        return []
    m, x0, y0 = c
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return [ct.reshape(-1, 2).astype(np.float64) + (x0, y0) for ct in contours]


def parts_and_holes(mask: np.ndarray) -> tuple[int, int]:
    """Number of 8-connected parts and of holes in a mask (OpenCV's two-level contour tree)."""
    import cv2

    c = _crop(mask)
    if c is None:
        return 0, 0
    _, hierarchy = cv2.findContours(c[0].astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    holes = int(np.count_nonzero(hierarchy[0][:, 3] >= 0))
    return len(hierarchy[0]) - holes, holes


def pixel_edge_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Boundary rings on the pixel-corner lattice: Nx2 float64 (x, y) arrays, corners at integer coordinates.

    Every side shared by a mask pixel and a background pixel is an edge, directed so the mask lies on its
    right (y pointing down); edges are chained into closed rings. Where two mask pixels touch only at a
    corner the chain turns towards the pixel it came along, so such pixels get separate rings. Collinear
    vertices are dropped.
    """
    c = _crop(mask)
    if c is None:
        return []
    m, x0, y0 = c
    p = np.pad(m, 1)
    inner = p[1:-1, 1:-1]
    ys, xs = np.nonzero(inner & ~p[:-2, 1:-1])  # top side open: (x, y) -> (x + 1, y)
    edges = [np.stack([xs, ys, xs + 1, ys], 1)]
    ys, xs = np.nonzero(inner & ~p[1:-1, 2:])  # right side: (x + 1, y) -> (x + 1, y + 1)
    edges.append(np.stack([xs + 1, ys, xs + 1, ys + 1], 1))
    ys, xs = np.nonzero(inner & ~p[2:, 1:-1])  # bottom side: (x + 1, y + 1) -> (x, y + 1)
    edges.append(np.stack([xs + 1, ys + 1, xs, ys + 1], 1))
    ys, xs = np.nonzero(inner & ~p[1:-1, :-2])  # left side: (x, y + 1) -> (x, y)
    edges.append(np.stack([xs, ys + 1, xs, ys], 1))
    e = np.concatenate(edges).tolist()

    outgoing: dict[tuple[int, int], list[int]] = {}
    for i, (ax, ay, _, _) in enumerate(e):
        outgoing.setdefault((ax, ay), []).append(i)
    used = [False] * len(e)
    rings = []
    for start in range(len(e)):
        if used[start]:
            continue
        ring = []
        i = start
        while not used[i]:
            used[i] = True
            ax, ay, bx, by = e[i]
            ring.append((ax, ay))
            options = [j for j in outgoing[(bx, by)] if not used[j]]
            if not options:
                break
            if len(options) > 1:  # corner touch: prefer the right turn (mask side), staying on this pixel
                dx, dy = bx - ax, by - ay
                right = (-dy, dx)
                options.sort(key=lambda j: (e[j][2] - bx, e[j][3] - by) != right)
            i = options[0]
        rings.append(_drop_collinear(np.array(ring, dtype=np.float64)) + (x0, y0))
    return rings


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    d1, d2 = ring - prev, nxt - ring
    keep = (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) != 0
    return ring[keep] if keep.any() else ring[:1]


def join_rings(rings: list[np.ndarray]) -> np.ndarray:
    """One closed polygon (Nx2) from several rings, joined by zero-width cuts along a minimum spanning tree."""
    if not rings:
        return np.zeros((0, 2))
    if len(rings) == 1:
        return rings[0]
    from scipy.sparse.csgraph import minimum_spanning_tree
    from scipy.spatial import cKDTree

    n = len(rings)
    trees = [cKDTree(r) for r in rings]
    dist = np.zeros((n, n))
    closest: dict[tuple[int, int], tuple[int, int]] = {}
    for a in range(n):
        for b in range(a + 1, n):
            d, ia = trees[a].query(rings[b])  # for every vertex of b, its nearest vertex of a
            jb = int(np.argmin(d))
            # + 1: csgraph reads 0 (rings sharing a corner) and tiny values as "no edge"; a constant added
            # to every edge of a complete graph leaves its minimum spanning tree unchanged
            dist[a, b] = float(d[jb]) + 1.0
            closest[(a, b)] = (int(ia[jb]), jb)
            closest[(b, a)] = (jb, int(ia[jb]))
    mst = minimum_spanning_tree(dist).toarray()
    children: dict[int, dict[int, list[tuple[int, int]]]] = {i: {} for i in range(n)}
    adj = {i: [] for i in range(n)}
    for a, b in zip(*np.nonzero(mst)):
        adj[int(a)].append(int(b))
        adj[int(b)].append(int(a))
    root = max(range(n), key=lambda i: len(rings[i]))
    seen = {root}
    stack = [root]
    while stack:  # orient the tree from the root: each child hangs at its parent's closest vertex
        a = stack.pop()
        for b in sorted(adj[a]):
            if b not in seen:
                seen.add(b)
                stack.append(b)
                ia, jb = closest[(a, b)]
                children[a].setdefault(ia, []).append((b, jb))
    if len(seen) != n:  # cannot happen with a complete graph; never drop a ring silently
        raise AssertionError(f"joined {len(seen)} of {n} rings")

    out: list[np.ndarray] = []

    def walk(r: int, entry: int) -> None:
        ring = rings[r]
        k = len(ring)
        for step in range(k + 1):  # around the ring and back to the entry vertex
            v = (entry + step) % k
            out.append(ring[v])
            if step < k:
                for child, jb in children[r].get(v, []):
                    walk(child, jb)
                    out.append(ring[v])

    walk(root, 0)
    return np.array(out[:-1])  # the last vertex repeats the first: the polygon closes itself


def mask_to_polygon(mask: np.ndarray, convention: str) -> np.ndarray:
    """The mask as one polygon (Nx2 float64 pixel coordinates) in the given vertex convention
    ("centre" for outline-painting rasterisers such as Ultralytics', "edge" for pycocotools)."""
    rings = pixel_centre_rings(mask) if convention == "centre" else pixel_edge_rings(mask)
    return join_rings(rings)


def rasterise_centre_polygon(points_norm: np.ndarray, width: int, height: int) -> np.ndarray:
    """HxW bool mask of a normalised polygon the way Ultralytics draws YOLO-seg labels: scale by the image
    size, truncate to int, `cv2.fillPoly` (outline included)."""
    import cv2

    out = np.zeros((height, width), dtype=np.uint8)
    pts = (np.asarray(points_norm, dtype=np.float64).reshape(-1, 2) * (width, height)).astype(np.int32)
    if len(pts):
        cv2.fillPoly(out, [pts], 1)
    return out.astype(bool)


def rasterise_coco_polygons(polygons: list[list[float]], width: int, height: int) -> np.ndarray:
    """HxW bool mask of COCO polygons the way COCO tools read them (pycocotools, parts merged)."""
    from b2p.masks import polygons_to_mask

    return polygons_to_mask(polygons, height, width)
