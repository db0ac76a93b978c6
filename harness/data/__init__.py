"""Datasets in DAVIS-2017 and MOSE-style layouts, frame and mask I/O."""

from harness.data.dataset import Dataset, Sequence, open_dataset, read_split
from harness.data.masks import DAVIS_PALETTE, VOID_ID, read_frame, read_mask, write_mask

__all__ = [
    "DAVIS_PALETTE",
    "VOID_ID",
    "Dataset",
    "Sequence",
    "open_dataset",
    "read_frame",
    "read_mask",
    "read_split",
    "write_mask",
]
