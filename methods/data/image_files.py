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
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # one channel


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


def _visible(path: Path, root: Path) -> bool:
    """Not hidden (``.DS_Store``, ``.thumbnails/``, ``._IMG_0001.JPG``): no part below ``root``
    starts with a dot."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_image_folder(root: str | Path, labels: str = "auto") -> ImageTable:
    """Every image file under ``root`` (recursive, hidden files and folders left out), sorted.

    ``labels``: ``folders`` takes the first sub-folder below ``root`` as the class (class ids
    follow the sorted folder names, as torchvision's ``ImageFolder``); ``none`` lists an
    unlabelled source (every label -1); ``auto`` is ``folders`` when every image sits in a
    sub-folder, else ``none`` (a flat folder of photos). Raises ``ImageSourceError`` for a
    missing folder, one without images, or ``folders`` with images directly in ``root``."""
    root = Path(root)
    if labels not in ("auto", "folders", "none"):
        raise ValueError(f"labels must be auto, folders or none (got {labels!r})")
    if not root.is_dir():
        raise ImageSourceError(f"image folder {root} does not exist; set data.root to a folder "
                               "of images (optionally one sub-folder per class)")
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and _visible(p, root))
    if not files:
        raise ImageSourceError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    loose = [p for p in files if p.parent == root]
    if labels == "folders" and loose:
        raise ImageSourceError(f"{loose[0]} is not in a class sub-folder; move it into one, or "
                               "set data.labels: none (or auto) to train without labels")
    if labels == "none" or loose:
        return ImageTable(str(root), _unit_columns([str(p) for p in files], [-1] * len(files),
                                                   [1] * len(files), [-1] * len(files)))
    classes = sorted({p.relative_to(root).parts[0] for p in files})
    ids = {name: i for i, name in enumerate(classes)}
    files.sort(key=lambda p: (ids[p.relative_to(root).parts[0]], p))
    class_ids = [ids[p.relative_to(root).parts[0]] for p in files]
    return ImageTable(str(root), _unit_columns([str(p) for p in files], [-1] * len(files),
                                               [1] * len(files), class_ids), tuple(classes))


def list_parquet(root: str | Path, image_column: str = "image",
                 label_column: str | None = "label", labels: str = "auto") -> ImageTable:
    """Every row group of ``root`` (one ``.parquet`` file, or a folder of them, sorted), from
    the files' metadata only. ``labels``: ``folders`` requires ``label_column`` in every file,
    ``none`` ignores it, ``auto`` reads it where every file has it and else lists the source as
    unlabelled (null labels are unlabelled rows either way). Raises ``ImageSourceError`` naming
    the file for a missing file, an unreadable footer or a missing column."""
    import pyarrow.parquet as pq

    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet")) if root.is_dir() else []
    if not files:
        raise ImageSourceError(f"no parquet files at {root}; set data.root to a .parquet file or "
                               "a folder of them")
    paths, groups, counts, unlabelled = [], [], [], []
    if labels == "none":
        label_column = None
    for path in files:
        try:
            meta = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a corrupt footer
            raise ImageSourceError(f"{path} is not a readable parquet file ({exc}); rewrite or "
                                   "remove it") from None
        names = meta.schema_arrow.names
        if image_column not in names:
            raise ImageSourceError(f"{path} has no column {image_column!r} (it has "
                                   f"{', '.join(names)}); set data.image_column")
        if label_column is not None and label_column not in names:
            if labels == "folders":
                raise ImageSourceError(f"{path} has no column {label_column!r} (it has "
                                       f"{', '.join(names)}); set data.label_column, or "
                                       "data.labels: none to train without labels")
            unlabelled.append(path)
        for g in range(meta.num_row_groups):
            paths.append(str(path))
            groups.append(g)
            counts.append(meta.metadata.row_group(g).num_rows)
    if sum(counts) == 0:
        raise ImageSourceError(f"the parquet files at {root} hold no rows")
    if unlabelled:  # auto: a source is labelled only where every file has the column
        label_column = None
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


def to_8bit(image):
    """A PIL image with 8 bits per channel: 16-bit (``I;16*``, and ``I`` holding 16-bit values, as
    PIL opens 16-bit PNGs) scaled by 255 / 65535, larger integers by their maximum, float (``F``)
    images in [0, 1] by 255 and other float ranges from their minimum to their maximum, so the
    darkest and brightest pixels are kept apart instead of clipped to white. Other modes are
    returned as they are."""
    from PIL import Image

    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    a = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        low, high = (0.0, 1.0) if a.size and a.min() >= 0 and a.max() <= 1 else (a.min(), a.max())
    else:
        low, high = 0.0, 65535.0 if a.max(initial=0) <= 65535 else float(a.max())
    scaled = (a - low) * (255.0 / (high - low)) if high > low else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(image):
    """Palette, alpha and CMYK images as RGB (or L); transparent pixels over white, the page a
    transparent logo or scan is drawn on."""
    from PIL import Image

    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image


def decode_image(data: bytes | str, size: int, channels: int) -> np.ndarray | None:
    """One encoded image (bytes, or a file path) as uint8 ``[channels, size, size]``; None when
    it cannot be decoded (empty, truncated, not an image).

    As a camera roll needs: JPEGs decode at the smallest scale that still covers ``size``
    (``Image.draft``), the EXIF orientation is applied (photos come out upright), 16-bit and
    float images are scaled to 8 bit (``to_8bit``), palette, alpha and CMYK images are converted
    (``_flatten_alpha``), then the centre square is resized to ``size`` with antialiasing
    (``ImageOps.fit``: the aspect ratio is kept, as torchvision's Resize + CenterCrop)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.draft(image.mode, (size, size))  # JPEG only; a no-op for other formats
            image = ImageOps.exif_transpose(image)
            image = _flatten_alpha(to_8bit(image))
            image = image.convert("L" if channels == 1 else "RGB")
            image = ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
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


def write_image_folder(images: np.ndarray, labels: np.ndarray | None, classes: tuple[str, ...],
                       out: str | Path, size: int | None = None, rgb: bool = False,
                       repeat: int = 1) -> Path:
    """Write uint8 ``images`` [N, C, H, W] as ``out/<label>-<class>/<n>.png``, or
    ``out/<label>/<n>.png`` where the class name is the label itself, or flat as ``out/<n>.png``
    when ``labels`` is None (``repeat`` copies under new names, ``rgb`` turns grayscale into 3
    equal channels, ``size`` resizes). Returns ``out``."""

    out = Path(out)
    if labels is None:
        out.mkdir(parents=True, exist_ok=True)
        for n, image in enumerate(images):
            png = _png(image, size, rgb)
            for r in range(repeat):
                (out / f"{r * len(images) + n:07d}.png").write_bytes(png)
        return out
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


def write_parquet(images: np.ndarray, labels: np.ndarray | None, out: str | Path,
                  size: int | None = None, rgb: bool = False, rows_per_group: int = 100,
                  files: int = 1) -> Path:
    """Write uint8 ``images`` [N, C, H, W] as PNG bytes in an ``image`` column with an int64
    ``label`` column (none when ``labels`` is None): ``files`` parquet files under the folder
    ``out``. Returns ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f, rows in enumerate(np.array_split(np.arange(len(images)), files)):
        encoded = [_png(images[n], size, rgb) for n in rows]
        columns = {"image": pa.array(encoded, pa.binary())}
        if labels is not None:
            columns["label"] = pa.array(labels[rows].astype(np.int64))
        table = pa.table(columns)
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
