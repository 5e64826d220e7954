"""b2p: turn box annotations into pixel-level defect masks and a compact segmentation model.

Pipeline (one sub-package per stage): ingest -> teach -> student (train, predict) -> evaluate -> browse,
chained by DVC (see dvc.yaml). Shared concepts live in one module each: `labels` (class list and the
label-map format), `splits` (the split rule), `dataset` (the canonical annotation file),
`metrics` (every metric definition).
"""

__version__ = "0.1.0"
