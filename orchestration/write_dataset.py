"""``protoray write-dataset``: a built-in dataset written to disk as an image folder or as
parquet, the two forms ``data.name: image_folder`` / ``parquet`` read, so that the streaming
path can be tried and tested without downloading anything.

Layout: ``OUT/train/<class>/<n>.png`` and ``OUT/val/<class>/<n>.png`` (the ImageNet layout),
or ``OUT/train/part-*.parquet`` and ``OUT/val/part-*.parquet`` (PNG bytes in ``image``, an int64
``label``). ``repeat`` writes every training image that many times under new names: a larger
dataset of the same pictures, for memory benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from methods.data.datasets import load_dataset
from methods.data.image_files import write_image_folder, write_parquet

FORMATS = ("image_folder", "parquet")
IMAGES_PER_PARQUET_FILE = 50_000


def write_dataset(name: str, out: str | Path, fmt: str = "image_folder", size: int | None = None,
                  rgb: bool = False, repeat: int = 1, limit: int | None = None,
                  rows_per_group: int = 100, unlabelled: bool = False) -> Path:
    """Write the ``train`` (``repeat`` times) and ``test`` splits of the built-in dataset ``name``
    under ``out``, the first ``limit`` images of each; returns ``out``. ``unlabelled``: the
    training split without labels, as people's own photos come (a flat folder, parquet without
    a label column); the val split keeps them. Raises ``ValueError`` for an unknown format or a
    non-empty ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new folder (nothing is overwritten)")
    for split, folder in (("train", "train"), ("test", "val")):
        ds = load_dataset(name, split)
        n = min(limit, len(ds)) if limit else len(ds)
        images, labels = ds.images[:n].numpy(), ds.labels[:n].numpy()
        copies = repeat if split == "train" else 1
        if unlabelled and split == "train":
            labels = None
        if fmt == "image_folder":
            write_image_folder(images, labels, ds.classes, out / folder, size, rgb, copies)
        else:
            images = np.concatenate([images] * copies)
            labels = None if labels is None else np.concatenate([labels] * copies)
            write_parquet(images, labels, out / folder, size, rgb, rows_per_group,
                          files=max(1, len(images) // IMAGES_PER_PARQUET_FILE))
    return out
