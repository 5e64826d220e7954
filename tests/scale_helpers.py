"""A teacher for tests/test_scale.py that Ray workers import (tests/ is on their PYTHONPATH there): the box
teacher, slowed down, leaving the id of each process that teaches an image in a folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

from b2p.teach.box import BoxTeacher


class SlowBoxTeacher(BoxTeacher):
    """BoxTeacher (same name and settings, so the same masks and resume hash) taking `seconds` an image."""

    def __init__(self, pid_dir: str, seconds: float):
        self.pid_dir, self.seconds = pid_dir, seconds

    def predict(self, image, boxes):
        Path(self.pid_dir, str(os.getpid())).touch()
        time.sleep(self.seconds)
        return super().predict(image, boxes)
