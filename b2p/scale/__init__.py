"""Scaling out: the per-image stages over many workers (engine.py) and training over several processes (distributed.py)."""
