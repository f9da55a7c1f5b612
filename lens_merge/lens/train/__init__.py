"""Lens training (lens-method.md section 2): cached top-K training that yields a delta."""

from lens_merge.lens.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
