"""Tiny datasets in the Magnetic-Tile layout (ROOT/<CLASS>/Imgs/NAME.bmp + NAME.png) for the suite tests.

Made from the embedded demo (every image with its manual mask): an image goes to the folder of the class
covering most of its defect pixels, its mask (0 / 255, all defect pixels) beside it; images without a
defect go to the defect-free folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from b2p.fileio import read_image, write_bytes_atomic, write_png_atomic
from b2p.ingest.demo import make_demo_data
from b2p.labels import read_label_map


def make_folder_dataset(root: Path, prefix: str, free: str, images: int = 16, size: int = 64, seed: int = 3) -> dict[str, str]:
    """Write the dataset under `root` with class folders `<prefix><Class>` and `<prefix><free>`;
    returns {folder: class name as the suite should report it}."""
    import cv2

    src = root.parent / f".{root.name}-demo"
    make_demo_data(src, seed=seed, images=images, size=size, all_masks=True)
    names = ["background", *[ln.strip() for ln in (src / "classes.txt").read_text().splitlines() if ln.strip()]]
    folders: dict[str, str] = {}
    for img in sorted((src / "images").glob("*.png")):
        lm = read_label_map(src / "masks" / img.name)
        counts = np.bincount(lm.ravel(), minlength=len(names))[1:]
        cls = names[1 + int(counts.argmax())] if counts.any() else None
        folder = f"{prefix}{cls.capitalize()}" if cls else f"{prefix}{free}"
        folders[folder] = cls or "defect-free"
        ok, buf = cv2.imencode(".bmp", read_image(img)[..., ::-1])
        assert ok
        write_bytes_atomic(root / folder / "Imgs" / f"{img.stem}.bmp", buf.tobytes())
        write_png_atomic(root / folder / "Imgs" / f"{img.stem}.png", ((lm > 0) * 255).astype(np.uint8))
    return folders
