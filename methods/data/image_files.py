"""Image files on disk: list them without decoding, decode them in batches, and write them.

Two layouts, as users export them:
- an image folder, ``root/<class>/<image>`` of JPEG/PNG files of any sizes (the ImageNet
  layout), or ``root/train/<class>/...`` beside ``root/val/`` (or ``root/test/``);
- parquet files, a column of encoded image bytes (or Hugging Face's ``{"bytes", "path"}``
  struct) and an optional integer label column.

``list_images`` turns either into an ``ImageTable``: decode *units* (an image file, or a parquet
row group) with the global index of their first image, so the index of every image is fixed
before anything is decoded and travels with it. ``decode_units`` decodes a batch of units (what a
Ray Data task runs in ``orchestration.streaming``, and what the in-memory loader runs in
process); an unreadable or truncated image is left out, never replaced, so no index shifts.
No Ray import here: a plain PyTorch program can use both.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes that hold one channel


class ImageSourceError(ValueError):
    """The files of an image source cannot be used as configured; one line naming the file."""


@dataclass
class ImageTable:
    """Every image of one split, listed but not decoded.

    ``units`` is a dict of equal-length numpy arrays: ``path`` (str), ``row_group`` (-1 for an
    image file), ``first_index`` (global index of the unit's first image), ``num_rows`` (images
    in the unit) and ``label`` (-1 where the label is read from a parquet column or absent).
    """

    root: str
    units: dict[str, np.ndarray]
    classes: tuple[str, ...] = ()
    image_column: str = "image"
    label_column: str | None = "label"

    def __len__(self) -> int:
        return int(self.units["num_rows"].sum())

    @property
    def num_units(self) -> int:
        return len(self.units["path"])

    def take(self, rows: np.ndarray) -> ImageTable:
        """The units ``rows`` (positions), renumbered so their images are indexed 0..n-1."""
        units = {k: v[rows] for k, v in self.units.items()}
        units["first_index"] = np.concatenate([[0], np.cumsum(units["num_rows"])[:-1]]).astype(np.int64)
        return ImageTable(self.root, units, self.classes, self.image_column, self.label_column)

    def shard(self, rank: int, world_size: int) -> ImageTable:
        """Units ``rank, rank + W, ...`` with their global indices kept (rank r's fixed shard)."""
        units = {k: v[rank::world_size] for k, v in self.units.items()}
        return ImageTable(self.root, units, self.classes, self.image_column, self.label_column)


def _unit_columns(paths: list[str], row_groups: list[int], num_rows: list[int],
                  labels: list[int]) -> dict[str, np.ndarray]:
    counts = np.asarray(num_rows, dtype=np.int64)
    return {
        "path": np.asarray(paths, dtype=object),
        "row_group": np.asarray(row_groups, dtype=np.int64),
        "first_index": np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
        "num_rows": counts,
        "label": np.asarray(labels, dtype=np.int64),
    }


def split_folder(root: Path, split: str) -> Path:
    """``root/train`` (``root/val`` or ``root/test`` for the test split) when that layout is
    used, else ``root`` itself for training. Raises ``FileNotFoundError`` for a missing test
    split."""
    names = ("train",) if split == "train" else ("val", "test")
    for name in names:
        if (root / name).is_dir():
            return root / name
    if split == "train":
        return root
    raise FileNotFoundError(f"{root} has no val/ or test/ folder")


def list_image_folder(root: str | Path) -> ImageTable:
    """Every image file under ``root/<class>/``, sorted by class then path (class ids follow the
    sorted folder names, as torchvision's ``ImageFolder``). Raises ``ImageSourceError`` for a
    missing folder or one without images in class sub-folders."""
    root = Path(root)
    if not root.is_dir():
        raise ImageSourceError(f"image folder {root} does not exist; set data.root to a folder "
                               "with one sub-folder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise ImageSourceError(f"image folder {root} holds no images in class sub-folders; "
                               f"expected {root}/<class>/<image>.png (or .jpg)")
    ones = [1] * len(paths)
    return ImageTable(str(root), _unit_columns(paths, [-1] * len(paths), ones, labels),
                      tuple(classes))


def list_parquet(root: str | Path, image_column: str = "image",
                 label_column: str | None = "label") -> ImageTable:
    """Every row group of ``root`` (one ``.parquet`` file, or a folder of them, sorted), from
    the files' metadata only. Raises ``ImageSourceError`` naming the file for a missing file, an
    unreadable footer or a missing column."""
    import pyarrow.parquet as pq

    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet")) if root.is_dir() else []
    if not files:
        raise ImageSourceError(f"no parquet files at {root}; set data.root to a .parquet file or "
                               "a folder of them")
    paths, groups, counts = [], [], []
    for path in files:
        try:
            meta = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a corrupt footer
            raise ImageSourceError(f"{path} is not a readable parquet file ({exc}); rewrite or "
                                   "remove it") from None
        names = meta.schema_arrow.names
        for column, key in ((image_column, "data.image_column"), (label_column, "data.label_column")):
            if column is not None and column not in names:
                raise ImageSourceError(f"{path} has no column {column!r} (it has "
                                       f"{', '.join(names)}); set {key}")
        for g in range(meta.num_row_groups):
            paths.append(str(path))
            groups.append(g)
            counts.append(meta.metadata.row_group(g).num_rows)
    if sum(counts) == 0:
        raise ImageSourceError(f"the parquet files at {root} hold no rows")
    return ImageTable(str(root), _unit_columns(paths, groups, counts, [-1] * len(paths)), (),
                      image_column, label_column)


def channels_of(mode: str) -> int:
    return 1 if mode in GRAY_MODES else 3


def check_channels(table: ImageTable) -> int:
    """The channel count every image of ``table`` shares (1 or 3), read from the image headers
    only (image files; for parquet, the first row group of each file). Unreadable files are
    passed over here: decoding skips and counts them. Raises ``ImageSourceError`` naming the first
    file whose mode differs, and how to convert all of them instead."""
    from PIL import Image

    first: tuple[str, int] | None = None
    seen_files: set[str] = set()
    for path, group in zip(table.units["path"], table.units["row_group"], strict=True):
        if group < 0:
            headers = [path]
        elif path in seen_files:
            continue
        else:
            seen_files.add(path)
            images, _ = read_row_group(path, 0, table.image_column)
            headers = [io.BytesIO(b) for b in images[:64] if b]
        for header in headers:
            try:
                with Image.open(header) as image:
                    channels = channels_of(image.mode)
            except Exception:  # PIL raises many types for a bad file; decoding counts it
                continue
            if first is None:
                first = (path, channels)
            elif channels != first[1]:
                raise ImageSourceError(
                    f"{path} has {channels} channel(s) but {first[0]} has {first[1]}; set "
                    "data.channels: 3 (or 1) to convert every image to RGB (or grayscale)")
    if first is None:
        raise ImageSourceError(f"no readable image found in {table.root}")
    return first[1]


def read_row_group(path: str, row_group: int, image_column: str,
                   label_column: str | None = None) -> tuple[list[bytes | None], list[int]]:
    """One parquet row group's encoded images (a Hugging Face ``{"bytes", "path"}`` struct gives
    its bytes) and labels (-1 where null or without ``label_column``)."""
    import pyarrow.parquet as pq

    columns = [image_column] + ([label_column] if label_column else [])
    table = pq.ParquetFile(path).read_row_group(row_group, columns=columns)
    images = [v.get("bytes") if isinstance(v, dict) else v
              for v in table.column(image_column).to_pylist()]
    labels = (table.column(label_column).to_pylist() if label_column else [None] * len(images))
    return images, [-1 if y is None else int(y) for y in labels]


def decode_image(data: bytes | str, size: int, channels: int) -> np.ndarray | None:
    """One encoded image (bytes, or a file path) as uint8 ``[channels, size, size]``, resized
    (bilinear, antialiased) to a square; None when it cannot be decoded (empty, truncated,
    not an image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            array = np.asarray(image, dtype=np.uint8)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for a bad file
        return None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_units(units: dict[str, np.ndarray], size: int, channels: int,
                 image_column: str = "image", label_column: str | None = "label"
                 ) -> dict[str, np.ndarray]:
    """Decode a batch of units (``ImageTable.units`` rows) into ``index`` [n] int64, ``label``
    [n] int64 and ``image`` [n, channels, size, size] uint8. Images that fail to decode are left
    out, so ``n`` may be less than the units' ``num_rows``; every image keeps its own index."""
    indices, labels, images = [], [], []
    for path, group, first, label in zip(units["path"], units["row_group"], units["first_index"],
                                         units["label"], strict=True):
        if group < 0:
            rows = [(int(first), str(path), int(label))]
        else:
            try:
                data, ys = read_row_group(str(path), int(group), image_column, label_column)
            except Exception:  # an unreadable row group: all its images are skipped
                continue
            rows = [(int(first) + i, d, y) for i, (d, y) in enumerate(zip(data, ys, strict=True))]
        for index, data, y in rows:
            image = decode_image(data, size, channels) if data else None
            if image is not None:
                indices.append(index)
                labels.append(y)
                images.append(image)
    return {
        "index": np.asarray(indices, dtype=np.int64),
        "label": np.asarray(labels, dtype=np.int64),
        "image": (np.stack(images) if images
                  else np.zeros((0, channels, size, size), dtype=np.uint8)),
    }


def write_image_folder(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                       out: str | Path, size: int | None = None, rgb: bool = False,
                       repeat: int = 1) -> Path:
    """Write uint8 ``images`` [N, C, H, W] as ``out/<label>-<class>/<n>.png``, or
    ``out/<label>/<n>.png`` where the class name is the label itself (``repeat`` copies under new
    names, ``rgb`` turns grayscale into 3 equal channels, ``size`` resizes). Returns ``out``."""

    out = Path(out)
    # numbered, so that the sorted folder names give back the label ids
    count = len(classes) or int(labels.max()) + 1
    width = len(str(count - 1))
    names = [f"{i:0{width}d}" + (f"-{classes[i].replace('/', '-')}"
                                 if classes and classes[i] != str(i) else "") for i in range(count)]
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        png = _png(image, size, rgb)
        for r in range(repeat):
            (out / names[int(label)] / f"{r * len(images) + n:07d}.png").write_bytes(png)
    return out


def write_parquet(images: np.ndarray, labels: np.ndarray, out: str | Path, size: int | None = None,
                  rgb: bool = False, rows_per_group: int = 100, files: int = 1) -> Path:
    """Write uint8 ``images`` [N, C, H, W] as PNG bytes in an ``image`` column with an int64
    ``label`` column: ``files`` parquet files under the folder ``out``. Returns ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f, rows in enumerate(np.array_split(np.arange(len(images)), files)):
        encoded = [_png(images[n], size, rgb) for n in rows]
        table = pa.table({"image": pa.array(encoded, pa.binary()),
                          "label": pa.array(labels[rows].astype(np.int64))})
        pq.write_table(table, out / f"part-{f:04d}.parquet", row_group_size=rows_per_group)
    return out


def _png(image: np.ndarray, size: int | None, rgb: bool) -> bytes:
    """uint8 ``[C, H, W]`` as PNG bytes (fast compression: these files are read, not kept)."""
    from PIL import Image

    pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    if rgb:
        pil = pil.convert("RGB")
    if size:
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
