"""The data pipeline: layouts, class tables and mask encodings, decoding, transforms, statistics and a dataset doctor.

Every layout yields (image, mask) pairs: a uint8 image [3, H, W] and an int64 mask [H, W] of class indices, with
IGNORE_INDEX (255) wherever the raw mask value (an id, or an RGB colour) belongs to no class of the class table.
The annotation tools' exports are read by annotations.py; this file reads the folder, offroad and cityscapes
layouts itself.

    python dataset.py --data ROOT --check                 # what the masks hold, what is wrong, how to train
    python dataset.py --data ROOT --split train --stats   # exact pixel counts and suggested class weights
"""

import argparse
import colorsys
import csv
import errno
import hashlib
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision.datasets import Cityscapes
from tqdm import tqdm

from annotations import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    PIXEL_LIMIT,
    TOOL_FILES,
    TOOL_READERS,
    TOOL_SIGNS,
    VALIDATION_NAMES,
    ClassRow,
    ClassTable,
    DatasetError,
    DatasetTree,
    SplitFiles,
    cache_root,
    detect_tool,
    displayed_size,
    image_size,
    images_by_stem,
    is_ignore,
    open_image,
    orientation,
    over_pixel_limit,
    pair_by_stem,
    sample_masks,
    set_pixel_limit,
    too_many_pixels,
    unpack_zip,
)

try:
    import pyspng
except ImportError:  # an optional speed-up: Pillow decodes every PNG without it
    pyspng = None

UNKNOWN = 254  # ClassMap's marker for a raw value that is no key, before it becomes IGNORE_INDEX
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("auto", "offroad", "cityscapes", "folder", *TOOL_READERS, "demo")
ENCODINGS = ("auto", "index", "binary", "colour")
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FULL_DISK = 16 * 2**20  # bytes free below which a failed write is put down to a full disk
# a lossy (JPEG) mask value within this distance (per channel) of exactly one class value counts as that class
LOSSY_TOLERANCE = 24

# Offroad Segmentation dataset: raw 16-bit mask value -> (class index, name). Value 0 and anything else
# unlisted is ignored; the dataset's starter scripts fold them (and Flowers) into a Background class.
OFFROAD_CLASSES = (
    (100, "Trees"),
    (200, "Lush Bushes"),
    (300, "Dry Grass"),
    (500, "Dry Bushes"),
    (550, "Ground Clutter"),
    (600, "Flowers"),
    (700, "Logs"),
    (800, "Rocks"),
    (7100, "Landscape"),
    (10000, "Sky"),
)


# ---- class tables: which raw mask value or colour is which class -------------------------------------------------


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """RGB values [..., 3] (uint8) -> one int per colour, r << 16 | g << 8 | b."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def unpack_rgb(code: int) -> tuple[int, int, int]:
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


@dataclass(frozen=True, eq=False)
class ClassMap:
    """How the raw values of masks in one encoding become class indices.

    `keys` are raw values (index and binary masks: the id; colour masks: the colour packed by pack_rgb) and
    `classes` the class index of each, or IGNORE_INDEX for a value that means "ignore" on purpose. A value that
    is not a key is ignored too, but counted and reported, since it usually means a wrong table or encoding.
    Lossy (JPEG) masks match a value within LOSSY_TOLERANCE of exactly one key (never of two).
    """

    names: tuple[str, ...]
    palette: np.ndarray  # [num_classes, 3] uint8: the colour of each class in every picture
    keys: tuple[int, ...]
    classes: tuple[int, ...]
    encoding: str = "index"
    source: str = ""  # where the classes come from, for the start-up line

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @cached_property
    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.keys, kind="stable")
        return np.asarray(self.keys, np.int64)[order], np.asarray(self.classes, np.uint8)[order]

    @cached_property
    def _tolerance(self) -> int:
        keys = self._sorted[0]
        if self.encoding == "colour":
            rgb = np.array([unpack_rgb(int(k)) for k in keys])
            gaps = np.abs(rgb[:, None] - rgb[None]).max(-1) + np.eye(len(keys), dtype=np.int64) * 999
        else:
            gaps = np.diff(keys)
        gap = int(gaps.min()) if gaps.size else 999
        return max(0, min(LOSSY_TOLERANCE, (gap - 1) // 2))

    def lookup(self, values: np.ndarray, lossy: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Class indices (uint8, IGNORE_INDEX for no class) and a `known` mask of raw values of any shape."""
        keys, classes = self._sorted
        values = np.asarray(values, np.int64)
        if not lossy or self._tolerance == 0:
            at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
            known = keys[at] == values
        elif self.encoding == "colour":  # nearest colour by the largest channel difference
            rgb = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], -1)
            best, at = np.full(values.shape, 999), np.zeros(values.shape, np.int64)
            for i, key in enumerate(keys):
                distance = np.abs(rgb - np.array(unpack_rgb(int(key)))).max(-1)
                at, best = np.where(distance < best, i, at), np.minimum(distance, best)
            known = best <= self._tolerance
        else:
            right = np.clip(np.searchsorted(keys, values), 1, len(keys) - 1) if len(keys) > 1 else np.zeros_like(values)
            left = np.maximum(right - 1, 0)
            at = np.where(np.abs(keys[left] - values) <= np.abs(keys[right] - values), left, right)
            known = np.abs(keys[at] - values) <= self._tolerance
        return np.where(known, classes[at], IGNORE_INDEX).astype(np.uint8), known

    @cached_property
    def _lut(self) -> np.ndarray:
        """lookup() of every 16-bit id, with UNKNOWN for an id that is no key, so that an id mask maps (and its
        unknown pixels are found) with one np.take: 6 ms -> 2 ms for a 2048x1024 mask."""
        mask, known = self.lookup(np.arange(65536))
        return np.where(known, mask, UNKNOWN).astype(np.uint8)

    def apply(self, raw: np.ndarray, lossy: bool = False) -> tuple[np.ndarray, int]:
        """A raw mask (ids [H, W], or RGB [H, W, 3] for colour masks) -> class indices [H, W] (uint8), and the
        number of pixels whose value is no key."""
        if self.encoding == "colour" or lossy or self.num_classes >= UNKNOWN:
            mask, known = self.lookup(pack_rgb(raw) if self.encoding == "colour" else raw, lossy)
            return mask, int(known.size - np.count_nonzero(known))
        mask = np.take(self._lut, raw)
        unknown = mask == UNKNOWN
        n = int(np.count_nonzero(unknown))
        if n:
            mask[unknown] = IGNORE_INDEX
        return mask, n

    def count(self, values: np.ndarray, pixels: np.ndarray, lossy: bool = False) -> tuple[np.ndarray, dict[int, int]]:
        """A mask's histogram (distinct raw `values` and their `pixels`, as mask_values gives them) as pixels per
        class [num_classes + 1] (the last: ignored), and the pixels of each value that has no class."""
        classes, known = self.lookup(values, lossy)
        counts = np.bincount(classes, weights=pixels, minlength=256).astype(np.int64)
        strange = dict(zip(np.asarray(values)[~known].tolist(), np.asarray(pixels)[~known].tolist()))
        return np.append(counts[: self.num_classes], counts[IGNORE_INDEX]), strange

    def to_dict(self) -> dict:
        """Plain values, for a checkpoint that loads with torch.load(weights_only=True)."""
        return {"names": list(self.names), "palette": self.palette.tolist(), "keys": list(self.keys),
                "classes": list(self.classes), "encoding": self.encoding, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassMap":
        palette = np.array(d["palette"], np.uint8).reshape(-1, 3)
        return cls(tuple(d["names"]), palette, tuple(d["keys"]), tuple(d["classes"]), d["encoding"], d["source"])


def distinct_palette(n: int) -> np.ndarray:
    """n well-separated colours: hues stepped by the golden ratio, alternating saturation and brightness."""
    colours = [
        colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.9 - 0.35 * (i % 2), 0.95 - 0.3 * ((i // 2) % 2)) for i in range(n)
    ]
    return (np.array(colours) * 255).round().astype(np.uint8).reshape(n, 3)


def class_map_of(table: ClassTable, encoding: str) -> ClassMap:
    """The ClassMap for masks in `encoding`: colour masks use the table's colours, index masks its ids (or i for
    class i, with 255 meaning ignore, when the table has no ids)."""
    names = table.names
    index = {name: i for i, name in enumerate(names)}
    of = lambda row: IGNORE_INDEX if is_ignore(row.name) else index[row.name]  # noqa: E731
    if encoding == "colour":
        if not table.has_colours:
            raise DatasetError(f"class table {table.source} has no r,g,b columns, which colour masks need")
        pairs = {int(pack_rgb(np.array(r.colour))): of(r) for r in table.rows if r.colour is not None}
    elif table.has_ids:
        pairs = {r.id: of(r) for r in table.rows if r.id is not None}
    else:
        pairs = {i: i for i in range(len(names))} | {IGNORE_INDEX: IGNORE_INDEX}
    palette = distinct_palette(len(names))
    for row in reversed(table.rows):  # a class's first colour wins
        if row.colour is not None and not is_ignore(row.name):
            palette[index[row.name]] = row.colour
    return ClassMap(names, palette, tuple(pairs), tuple(pairs.values()), encoding, table.source)


def offroad_table() -> ClassTable:
    return ClassTable(tuple(ClassRow(name, raw) for raw, name in OFFROAD_CLASSES), "the offroad table")


def cityscapes_table() -> ClassTable:
    """The 19 evaluated classes by their labelIds, in trainId order with Cityscapes' own colours; the other
    labelIds mean ignore."""
    evaluated = sorted((c for c in Cityscapes.classes if 0 <= c.train_id < IGNORE_INDEX), key=lambda c: c.train_id)
    void = [ClassRow("ignore", c.id) for c in Cityscapes.classes if c.id >= 0 and not 0 <= c.train_id < IGNORE_INDEX]
    return ClassTable(tuple(ClassRow(c.name, c.id, c.color) for c in evaluated) + tuple(void), "the cityscapes table")


def numbered_table(num_classes: int, class_names: list[str] | None = None) -> ClassTable:
    """--num-classes / --class-names: ids 0..C-1 (255 and ids at or above C are ignored)."""
    names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(num_classes))
    if len(names) != num_classes:
        raise DatasetError(f"--class-names gives {len(names)} names but --num-classes is {num_classes}")
    if len(set(names)) != len(names):
        raise DatasetError("--class-names repeats a name")
    return ClassTable(tuple(ClassRow(n) for n in names), f"--num-classes {num_classes}")


def binary_table(foreground: int, class_names: list[str] | None = None) -> ClassTable:
    """Binary masks: 0 is the background, `foreground` (255 or 1) the foreground."""
    names = class_names or ["background", "foreground"]
    if len(names) != 2:
        raise DatasetError(f"binary masks have 2 classes, but --class-names gives {len(names)}")
    return ClassTable((ClassRow(names[0], 0), ClassRow(names[1], foreground)), f"binary masks (0 and {foreground})")


def _table_int(cell: dict, column: str, top: int, where: str) -> int | None:
    if column not in cell:
        return None
    try:
        value = int(cell[column])
    except ValueError:
        raise DatasetError(f"{where}: {column} {cell[column]!r} is not a whole number") from None
    if not 0 <= value <= top:
        raise DatasetError(f"{where}: {column} {value} is outside 0..{top}")
    return value


def read_class_table(path: Path) -> ClassTable:
    """A class table CSV: a header row with `name` and optionally `id` and `r,g,b`, then one row per class in
    index order; blank lines and lines starting with # are skipped. Every error names the file and the row."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read class table {path}: {e}") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise DatasetError(
            f"class table {path} is empty; it needs a header row (name[,id][,r,g,b]) and a row per class"
        )
    header_line, header = numbered[0][0], [h.strip().lower() for h in next(csv.reader([numbered[0][1]]))]
    where = lambda n: f"class table {path}, row {n}"  # noqa: E731
    if "name" not in header:
        raise DatasetError(f"{where(header_line)}: the header has no `name` column (columns: name[,id][,r,g,b])")
    rgb = [c for c in ("r", "g", "b") if c in header]
    if rgb and len(rgb) != 3:
        raise DatasetError(f"{where(header_line)}: colours need all three columns r,g,b, not only {','.join(rgb)}")
    rows, seen_ids, seen_colours = [], {}, {}
    for n, line in numbered[1:]:
        cells = [c.strip() for c in next(csv.reader([line]))]
        if len(cells) != len(header):
            raise DatasetError(f"{where(n)}: {len(cells)} cells for {len(header)} columns ({','.join(header)})")
        cell = dict(zip(header, cells))
        if not cell["name"]:
            raise DatasetError(f"{where(n)}: the name is empty")
        row = ClassRow(cell["name"], _table_int(cell, "id", 65535, where(n)), None)
        if rgb:
            row = ClassRow(row.name, row.id, tuple(_table_int(cell, c, 255, where(n)) for c in "rgb"))
        for key, seen, what in ((row.id, seen_ids, "id"), (row.colour, seen_colours, "colour")):
            if key is not None and key in seen:
                raise DatasetError(f"{where(n)}: {what} {key} is already the {what} of row {seen[key]}")
            if key is not None:
                seen[key] = n
        if "id" not in header and not rgb and any(r.name == row.name for r in rows):
            raise DatasetError(f"{where(n)}: class {row.name!r} is listed twice")
        rows.append(row)
    table = ClassTable(tuple(rows), Path(path).name)
    if not table.names:
        raise DatasetError(f"class table {path} lists no class")
    return table


# ---- files and layouts ---------------------------------------------------------------------------------------------


def why_unpaired(image_dir: Path, mask_dir: Path) -> str:
    """Why a folder of masks gives no pair: a mask it holds, and its suffix or its stem."""
    masks = sorted(p for p in mask_dir.iterdir() if p.is_file()) if mask_dir.is_dir() else []
    if not masks:
        return f"{mask_dir} holds no file"
    readable = [p for p in masks if p.suffix.lower() in IMAGE_SUFFIXES]
    if not readable:
        return f"mask {masks[0]} has suffix {masks[0].suffix or '(none)'}, which is no image format Pillow reads"
    return f"mask {readable[0]} has no image of its stem {readable[0].stem!r} in {image_dir}"


def _match_by_stem(image_dir: Path, mask_dir: Path) -> SplitFiles:
    """Masks are any image format, named by the image's stem (a.jpg -> a.png, or a.gif, ...)."""
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetError(f"missing {'mask ' if folder == mask_dir else ''}folder {folder}")
    masks: dict[str, Path] = {}
    for mask in sorted(p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if mask.stem in masks:
            raise DatasetError(f"masks {masks[mask.stem]} and {mask} have the same name; keep one")
        masks[mask.stem] = mask
    files = pair_by_stem(images_by_stem(image_dir), masks, mask_dir)
    if not files.pairs and any(mask_dir.iterdir()):
        raise DatasetError(f"no mask of {mask_dir} pairs with an image: {why_unpaired(image_dir, mask_dir)}")
    return files


SPLIT_FOLDERS = {"offroad": ("Color_Images", "Segmentation"), "folder": ("images", "masks")}  # ROOT/SPLIT/...


def split_files(root: Path, layout: str, split: str) -> SplitFiles:
    """The files of one split of the offroad, folder or cityscapes layout, in a stable order."""
    if layout in SPLIT_FOLDERS:
        images, masks = SPLIT_FOLDERS[layout]
        return _match_by_stem(root / split / images, root / split / masks)
    if layout == "cityscapes":
        image_root, files = root / "leftImg8bit" / split, SplitFiles()
        if not image_root.is_dir():
            raise DatasetError(f"missing folder {image_root}")
        for city in sorted(p for p in image_root.iterdir() if p.is_dir()):
            for image in sorted(city.glob("*_leftImg8bit.png")):
                mask = root / "gtFine" / split / city.name / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
                if mask.is_file():
                    files.pairs.append((image, mask))
                else:
                    files.images_without_mask.append((image, mask))
        return files
    raise DatasetError(f"unknown --layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def find_splits(root: Path, layout: str) -> list[str]:
    """The splits a root of the offroad, folder or cityscapes layout holds, by name: folders with images and masks
    (a test split of images alone is no split to train or evaluate on)."""
    if layout == "cityscapes":
        return sorted(p.name for p in (root / "leftImg8bit").iterdir() if p.is_dir())
    images, masks = SPLIT_FOLDERS[layout]
    return sorted(p.name for p in root.iterdir() if (p / images).is_dir() and (p / masks).is_dir())


def is_lossy(path: Path) -> bool:
    return path.suffix.lower() in LOSSY_SUFFIXES


# ---- decoding: 8-bit PNGs through libspng (pyspng), the same pixels as Pillow's; every other file through Pillow -


def displayed(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (Pillow's exif_transpose), where annotations.orientation, the
    turn image_size reports, finds one: a broken EXIF block turns nothing, as it changes no size."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im


LINE_ENDINGS_CHANGED = (b"\x89PNG\r\r\n", b"\x89PNG\n\x1a\n")  # a PNG signature after LF -> CRLF, CRLF -> LF


def unreadable(what: str, path: Path, error: Exception) -> DatasetError:
    """The one line for a file that does not decode; a PNG whose signature shows a text-mode copy says so."""
    try:
        with path.open("rb") as f:
            converted = f.read(10).startswith(LINE_ENDINGS_CHANGED)
    except OSError:
        converted = False
    why = ("; its bytes show a line-ending (\\r\\n) conversion, as a text-mode copy makes (git's autocrlf, an FTP "
           "ASCII transfer): copy the export again as binary (in git: `*.png binary` in .gitattributes)"
           if converted else "")
    return DatasetError(f"cannot read {what} {path}: {error}{why}")


def fast_png(data: bytes, kinds: tuple[tuple[int, int], ...], fmt: str) -> np.ndarray | None:
    """The pixels of a PNG whose (bit depth, colour type) is one of `kinds`, as pyspng's `fmt` ("L" [H, W] or
    "RGB" [H, W, 3], alpha dropped as Pillow's convert("RGB") drops it), decoded by libspng (about 1.5x
    Pillow's speed, BENCHMARKS.md), or None: not a PNG, another kind, one with EXIF (Pillow turns it upright), no
    pyspng, over the pixel limit, or a file libspng refuses (Pillow then decodes it, or names the problem). Only
    kinds whose pixels equal Pillow's are asked for: 8-bit grey (0), RGB (2) and RGBA (6); libspng expands
    palettes (Pillow keeps the indices) and returns 16-bit grey as two bytes."""
    if pyspng is None or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or (data[24], data[25]) not in kinds:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if b"eXIf" in data or over_pixel_limit(width * height):
        return None  # Pillow's open refuses a file over the pixel limit, in one line
    try:
        return pyspng.load(data, fmt)
    except (RuntimeError, ValueError):
        return None


def _mask_pixels(im: Image.Image, path: Path, colour: bool) -> np.ndarray:
    if colour:
        return np.asarray(im.convert("RGB"))
    if im.mode in ("RGBA", "LA", "PA") and im.getextrema()[-1][0] == 255:
        im = im.convert(im.mode[:-1])  # a fully opaque alpha channel carries nothing
    if im.mode in ("RGB", "RGBA", "PA", "LA"):
        raw = np.asarray(im)
        if im.mode != "RGB" or not ((raw[..., 0] == raw[..., 1]).all() and (raw[..., 1] == raw[..., 2]).all()):
            raise DatasetError(
                f"mask {path} is a colour (mode {im.mode}) image; colour-coded masks need a class table "
                "with r,g,b columns (--classes FILE; `python dataset.py --check --write-classes FILE` "
                "writes one)"
            )
        return raw[..., 0].copy()
    raw = np.asarray(im)
    if raw.dtype == bool:  # 1-bit masks
        return raw.astype(np.uint8)
    if raw.dtype in (np.uint8, np.uint16):
        return raw
    # 32-bit and float masks (TIFF): whole values 0..65535 are class ids; a fraction or a negative is no class at
    # all, and flooring or clipping it would train one class as another
    wrong = ~((raw >= 0) & (raw <= 65535) & (raw == np.round(raw)))
    if wrong.any():
        raise DatasetError(f"mask {path} ({im.mode}, {raw.dtype}) holds values that are no class index, e.g. "
                           f"{raw[wrong].flat[0].item()} in {np.count_nonzero(wrong):,} pixels: a mask holds whole "
                           "class ids 0-65535 (a soft or probability mask must be thresholded first)")
    return raw.astype(np.uint16)


def read_mask(path: Path, colour: bool = False) -> np.ndarray:
    """The mask's raw values, unchanged, the way up its EXIF tag says: ids [H, W] (16-bit PNGs stay 16-bit; an
    RGB mask whose three channels are equal is read as one), or with colour=True its colours [H, W, 3] uint8."""
    try:
        data = path.read_bytes()
        raw = fast_png(data, ((8, 2), (8, 6)), "RGB") if colour else fast_png(data, ((8, 0),), "L")
        if raw is not None:
            return raw
        with open_image(path, data, "mask") as im:
            return _mask_pixels(displayed(im), path, colour)
    except (OSError, ValueError) as e:
        raise unreadable("mask", path, e) from None


def read_image(path: Path) -> torch.Tensor:
    """uint8 RGB tensor [3, H, W], the way up its EXIF tag says (a phone photo taken upright reads upright)."""
    try:
        data = path.read_bytes()
        rgb = fast_png(data, ((8, 2), (8, 6)), "RGB")
        if rgb is None:
            with open_image(path, data) as im:
                shown = displayed(im)
                rgb = np.array(shown if shown.mode == "RGB" else shown.convert("RGB"))  # writable
    except (OSError, ValueError) as e:
        raise unreadable("image", path, e) from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


# ---- mask encodings: index, binary or colour -----------------------------------------------------------------------


def mask_values(path: Path, colour: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The distinct raw values of a mask as read_mask reads it (colour: colours packed by pack_rgb), their pixel
    counts, and the mask's (width, height). 8-bit and RGB masks are counted by Pillow's own histogram, without
    a pixel array: counting a split's masks before training costs little more than decoding them."""
    try:
        with open_image(path, what="mask") as im:
            if not colour and im.mode in ("L", "P"):
                hist = np.array(im.histogram(), np.int64)
                values = np.flatnonzero(hist)
                return values, hist[values], displayed_size(im)
            if colour and im.mode == "RGB":
                found = im.getcolors(im.width * im.height)
                codes = pack_rgb(np.array([c for _, c in found], np.uint8)).astype(np.int64)
                order = np.argsort(codes)
                return codes[order], np.array([n for n, _ in found], np.int64)[order], displayed_size(im)
    except (OSError, ValueError) as e:
        raise unreadable("mask", path, e) from None
    raw = read_mask(path, colour)  # any other mode: through the pixels
    values, pixels = np.unique(pack_rgb(raw) if colour else raw, return_counts=True)
    return values, pixels, (raw.shape[1], raw.shape[0])


def is_colour_mask(path: Path) -> bool:
    """An RGB mask whose channels differ (for a lossy one: by more than LOSSY_TOLERANCE in over 1% of pixels)."""
    try:
        with open_image(path, what="mask") as im:
            if im.mode not in ("RGB", "RGBA"):
                return False
            rgb = np.asarray(im.convert("RGB")).astype(np.int16)
    except (OSError, ValueError):
        return False  # an unreadable mask: the checks that read every mask name it
    spread = rgb.max(-1) - rgb.min(-1)
    return (spread > LOSSY_TOLERANCE).mean() > 0.01 if is_lossy(path) else bool(spread.any())


def detect_encoding(masks: list[Path], num_classes: int | None) -> tuple[str, str, int]:
    """(encoding, why, foreground value of binary masks) from a sample of masks; unreadable ones are left to the
    checks that name them. Values that hold under 0.1% of a lossy mask's pixels are compression noise."""

    def values(colour: bool) -> set[int]:
        found = set()
        for mask in masks:
            try:
                values, counts, _ = mask_values(mask, colour)
            except DatasetError:
                continue
            found.update(values[counts >= 0.001 * counts.sum()].tolist() if is_lossy(mask) else values.tolist())
        return found

    if any(is_colour_mask(mask) for mask in masks):
        return "colour", f"the masks are RGB with {len(values(True))} distinct colours in {len(masks)} sampled", 0
    seen = values(False)
    if num_classes in (None, 2) and 1 in seen and seen <= {0, 1}:
        return "binary", "the masks hold only 0 and 1", 1
    if num_classes in (None, 2) and 255 in seen and seen <= {0, 255}:
        return "binary", "the masks hold only 0 and 255, so 255 is the foreground here, not ignore", 255
    low, high = (min(seen), max(seen)) if seen else (0, 0)
    return "index", f"the masks are single-channel with {len(seen)} distinct values in {low}..{high}", 0


class ClassesUnknown(DatasetError):
    """The masks need a class table (colour masks) or a class count (id masks) that nobody gave."""

    def __init__(self, message: str, encoding: str):
        super().__init__(message)
        self.encoding = encoding


@dataclass(frozen=True)
class ClassOptions:
    """What the user said about the classes: --classes FILE, --num-classes, --class-names, --mask-encoding."""

    table: Path | None = None
    num_classes: int | None = None
    names: tuple[str, ...] | None = None
    encoding: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClassOptions":
        names = tuple(args.class_names) if args.class_names else None
        return cls(Path(args.classes) if args.classes else None, args.num_classes, names, args.mask_encoding)


def given_table(own: ClassTable | None, options: ClassOptions) -> ClassTable | None:
    """The class table the user gave (--classes) or the layout's own; None where the masks must say."""
    if options.table is not None:
        if options.names:
            raise DatasetError("give --classes FILE or --class-names, not both (the table names the classes)")
        table = read_class_table(options.table)
    elif own is not None:
        table = own
        if options.names and tuple(options.names) != table.names:
            raise DatasetError(f"--class-names does not match {table.source}; pass --classes FILE to rename classes")
    else:
        return None
    if options.num_classes is not None and options.num_classes != len(table.names):
        raise DatasetError(
            f"--num-classes {options.num_classes} does not match {table.source} ({len(table.names)} classes)"
        )
    return table


def resolve_class_map(
    root: Path,
    layout: str,
    pairs: list[tuple[Path, Path]],
    options: ClassOptions,
    own: ClassTable | None = None,
    own_encoding: str = "auto",
) -> tuple[ClassMap, str]:
    """The ClassMap of a dataset and, in words, why its masks are read so: the class table (--classes, the
    layout's own `own`, --num-classes, or binary) and the encoding (--mask-encoding, the layout's own, or detected
    from a sample of `pairs`)."""
    table = given_table(own, options)
    if table is None and options.num_classes is None and options.names:
        options = replace(options, num_classes=len(options.names))  # --class-names alone: ids 0..len-1
    count = len(table.names) if table else options.num_classes
    encoding, why, foreground = options.encoding, f"--mask-encoding {options.encoding}", 255
    if encoding == "auto" and own_encoding != "auto" and options.table is None:
        encoding, why = own_encoding, f"the {layout} layout's masks are {own_encoding} masks"
    if encoding in ("auto", "binary"):
        detected, reason, value = detect_encoding(sample_masks(pairs), None if table and table.has_ids else count)
        encoding, why = (detected, reason) if encoding == "auto" else (encoding, why)
        foreground = 1 if value == 1 else 255
    if encoding == "binary" and table is not None and table.has_ids:
        encoding = "index"  # the table's ids say what each value is
    if encoding == "colour" and (table is None or not table.has_colours):
        raise ClassesUnknown(
            f"{why.replace('the masks', f'the masks of {root}')}, but no class table gives their colours: write "
            f"one with `python dataset.py --data {shlex.quote(str(root))} --check --write-classes classes.csv`, "
            "name its rows, and pass --classes classes.csv",
            "colour",
        )
    if encoding == "binary":
        if count not in (None, 2):
            raise DatasetError(f"binary masks have 2 classes, not {count} ({why})")
        names = table.names if table else options.names
        class_map = class_map_of(binary_table(foreground, list(names) if names else None), "binary")
        if table is not None and table.has_colours:
            class_map = replace(class_map, palette=class_map_of(table, "index").palette, source=table.source)
        return class_map, why
    if table is None:
        if options.num_classes is None:
            raise ClassesUnknown(
                f"--layout {layout} needs --num-classes or --classes FILE ({why}); "
                f"`python dataset.py --data {shlex.quote(str(root))} --check` shows them",
                "index",
            )
        table = numbered_table(options.num_classes, list(options.names) if options.names else None)
    return class_map_of(table, encoding), why


# ---- layouts: which reader a folder needs, and a validation split where it has none -------------------------------

DEFAULT_VAL_FRACTION = 0.1
NESTED_DEPTH = 3  # folders below --data searched for a dataset, as labelme's examples nest theirs


def split_folder_with(root: Path, name: str) -> bool:
    return any((d / name).is_dir() for d in root.iterdir() if d.is_dir())


# This file's own layouts beside annotations.TOOL_SIGNS: what each holds, and how to see it
LAYOUT_SIGNS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "cityscapes": ("leftImg8bit/ and gtFine/",
                   lambda root: (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()),
    **{layout: (f"SPLIT/{images}/", lambda root, images=images: split_folder_with(root, images))
       for layout, (images, _) in SPLIT_FOLDERS.items()},
}


def detect_layout(root: Path) -> str:
    """The layout of a dataset root, from the folders and files each tool writes."""
    if LAYOUT_SIGNS["cityscapes"][1](root):
        return "cityscapes"
    tool = detect_tool(root)
    if tool is not None:
        return tool
    for layout in ("offroad", "folder"):
        if LAYOUT_SIGNS[layout][1](root):
            return layout
    raise DatasetError(
        f"cannot detect the layout of {root}: expected SPLIT/images + SPLIT/masks (folder), SPLIT/Color_Images "
        f"(offroad), leftImg8bit + gtFine (cityscapes), {TOOL_FILES}; README's 'Your data' shows each"
    )


def detectable(root: Path) -> bool:
    try:
        detect_layout(root)
    except DatasetError:
        return False
    return True


def nested_datasets(root: Path, depth: int = NESTED_DEPTH) -> list[Path]:
    """The dataset roots below `root` (not below one another), up to `depth` folders down."""
    found = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))):
        if detectable(folder):
            found.append(folder)
        elif depth > 1:
            found += nested_datasets(folder, depth - 1)
    return found


def find_root(data: Path, layout: str) -> tuple[Path, str, list[str]]:
    """The dataset at `data`, or the one dataset a few folders below it (said in a note); several below it are
    named, and --data picks one. A forced layout must find what that layout holds."""
    if layout != "auto":
        what, seen = {**LAYOUT_SIGNS, **TOOL_SIGNS}.get(layout, ("", lambda _: True))
        if not seen(data):
            found = f"; it reads as {detect_layout(data)} without the flag" if detectable(data) else ""
            raise DatasetError(f"--layout {layout}: {data} holds no {what}{found}")
        return data, layout, []
    try:
        return data, detect_layout(data), []
    except DatasetError as e:
        below = nested_datasets(data)
        if len(below) == 1:
            return below[0], detect_layout(below[0]), [f"{data} holds one dataset, {below[0]}: read from there"]
        if below:
            raise DatasetError(f"{data} holds {len(below)} datasets: {', '.join(map(str, below))}; pass one of "
                               "them as --data") from None
        raise e from None


def read_tree(root: Path, layout: str) -> DatasetTree:
    if layout in TOOL_READERS:
        return TOOL_READERS[layout](root)
    if layout not in ("offroad", "folder", "cityscapes"):
        raise DatasetError(f"unknown --layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    table = {"offroad": offroad_table, "cityscapes": cityscapes_table}.get(layout, lambda: None)()
    tree = DatasetTree(root, layout, {s: split_files(root, layout, s) for s in find_splits(root, layout)}, table)
    images, masks = SPLIT_FOLDERS.get(layout, ("", ""))
    unlabelled = [p for p in root.iterdir() if images and (p / images).is_dir() and not (p / masks).is_dir()]
    tree.notes += [f"{folder / images} has no {masks}/ folder beside it: not a split" for folder in sorted(unlabelled)]
    return tree



def name_hash(name: str) -> float:
    """A file name's place in [0, 1), the same on every machine and whatever else the folder holds."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


def hold_out(tree: DatasetTree, fraction: float | None) -> None:
    """Where a tree has no validation split, hold out `fraction` (default 0.1, at least one) of its training
    images as split val, each chosen by a hash of its file name, so that adding images moves no other."""
    try:
        val = tree.resolve("val")
    except DatasetError:
        val = None
    if val is not None:
        if fraction is not None:
            raise DatasetError(f"--val-fraction: {tree.root} has a validation split ({val}, "
                               f"{len(tree.splits[val].pairs)} images); drop the flag to use it")
        return
    fraction = DEFAULT_VAL_FRACTION if fraction is None else fraction
    if not 0 < fraction < 1:
        raise DatasetError(f"--val-fraction {fraction} is not between 0 and 1")
    try:
        train = tree.resolve("train")
    except DatasetError:
        return
    pairs = tree.splits[train].pairs
    if len(pairs) < 2:
        return
    ranked = sorted(pairs, key=lambda pair: name_hash(pair[0].name))
    held = [pair for pair in ranked[:-1] if name_hash(pair[0].name) < fraction] or ranked[:1]
    tree.splits[train] = replace(tree.splits[train], pairs=[pair for pair in pairs if pair not in held])
    tree.splits["val"] = SplitFiles(held)
    tree.notes.append(f"no validation split: {len(held)} of the {len(pairs)} images of {train} are held out as val "
                      f"(--val-fraction {fraction}, by a hash of each file name)")


def open_tree(data: Path, layout: str = "auto", val_fraction: float | None = None) -> DatasetTree:
    """A dataset root, or an annotation tool's .zip (unpacked once beside it), as its layout reads it, with a
    validation split held out of the training images where it has none."""
    notes = []
    if data.suffix.lower() == ".zip" and data.is_file():
        data, note = unpack_zip(data)
        notes.append(note)
        inner = [p for p in data.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]  # Finder's
        if len(inner) == 1 and inner[0].is_dir() and detectable(inner[0]):
            data = inner[0]  # the export's own top folder
    if data.exists() and not data.is_dir():
        raise DatasetError(f"--data {data} is a file: give the dataset's folder, or an export's .zip")
    if not data.is_dir():
        raise DatasetError(f"--data folder {data} does not exist")
    data, layout, found = find_root(data, layout)
    tree = read_tree(data, layout)
    notes += found
    order = {name: rank for rank, names in enumerate((["train"], VALIDATION_NAMES, ["test"])) for name in names}
    tree.splits = dict(sorted(tree.splits.items(), key=lambda item: (order.get(item[0].lower(), 3), item[0])))
    tree.notes[:0] = notes
    hold_out(tree, val_fraction)
    return tree


def list_pairs(tree: DatasetTree, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of one split; an image without a mask is an error."""
    files = tree.splits[tree.resolve(split)]
    if files.images_without_mask:
        image, mask = files.images_without_mask[0]
        raise DatasetError(f"image {image} has no mask (expected {mask})")
    return files.pairs


# ---- transforms: resize, scale, crop, flip, jitter -----------------------------------------------------------------


@dataclass(frozen=True)
class TransformConfig:
    """size: resize to (H, W) first (None keeps each image's size); scale: random scale range;
    crop: random crop (H, W), padding masks with IGNORE_INDEX; train: enables the random parts;
    low_res_epochs: progressive resizing, epochs 1..N at half the size and half the crop (`at_epoch`);
    resolution: the share of size and crop in force (1.0, or 0.5 in a low-resolution epoch)."""

    size: tuple[int, int] | None = None
    scale: tuple[float, float] | None = None
    crop: tuple[int, int] | None = None
    hflip: bool = True
    augment: bool = False
    train: bool = True
    low_res_epochs: int = 0
    resolution: float = 1.0

    def at_epoch(self, epoch: int) -> "TransformConfig":
        """The transform of a training epoch (counted from 1): at half resolution up to `low_res_epochs`, a quarter
        of the pixels per step, so the cheap epochs come first (fast.ai's progressive resizing)."""
        return replace(self, resolution=0.5) if self.train and 1 <= epoch <= self.low_res_epochs else self


def scaled(hw: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(hw[0] * factor)), max(1, round(hw[1] * factor))


def rotate_hue(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Shift the hue of a uint8 image [3, H, W] by `factor` turns: a rotation of RGB space by 2 pi factor about
    the grey axis, one 3x3 matrix product. Greys stay as they are, and a colour's HSV hue moves by `factor` to
    within 0.003 of a turn for |factor| <= 0.02 (torchvision's HSV round trip costs 13x more, BENCHMARKS.md)."""
    t = 2 * math.pi * factor
    c, k, q = math.cos(t), (1 - math.cos(t)) / 3, math.sin(t) / math.sqrt(3)
    rotation = torch.tensor([[c + k, k - q, k + q], [k + q, c + k, k - q], [k - q, k + q, c + k]])
    rgb = rotation @ image.reshape(3, -1).float()
    return rgb.add_(0.5).clamp_(0, 255).to(torch.uint8).view(image.shape)


def colour_jitter(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02), in random order, from `generator`;
    the hue step is `rotate_hue`."""
    factors = torch.rand(4, generator=generator)
    order = torch.randperm(4, generator=generator).tolist()
    for i in order:
        if i == 0:
            image = TF.adjust_brightness(image, 0.7 + 0.6 * float(factors[0]))
        elif i == 1:
            image = TF.adjust_contrast(image, 0.7 + 0.6 * float(factors[1]))
        elif i == 2:
            image = TF.adjust_saturation(image, 0.7 + 0.6 * float(factors[2]))
        else:
            image = rotate_hue(image, -0.02 + 0.04 * float(factors[3]))
    return image


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 image(s) [..., 3, H, W] at `size` (H, W), antialiased: as training, evaluation and prediction see them."""
    return image if tuple(image.shape[-2:]) == tuple(size) else TF.resize(image, list(size), antialias=True)


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    return resize_image(image, size), TF.resize(mask, list(size), interpolation=T.InterpolationMode.NEAREST)


def transform_pair(
    image: torch.Tensor, mask: torch.Tensor, cfg: TransformConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image [3, H, W] and uint8 mask [H, W] -> uint8 image [3, h, w] and int64 mask [h, w]. The random
    choices come from `generator` (default: torch's global one).

    The image stays uint8 (4x less to copy to the device); `normalize` runs on the device. With a crop, only the
    source region under the crop is resized: at scale 2 that is a quarter of the image, not four times it.
    """
    h0, w0 = image.shape[-2:]
    hb, wb = scaled(cfg.size or (h0, w0), cfg.resolution)
    crop = scaled(cfg.crop, cfg.resolution) if cfg.crop is not None else None
    g = generator
    s = float(torch.empty(1).uniform_(*cfg.scale, generator=g)) if cfg.train and cfg.scale else 1.0
    hs, ws = max(1, round(hb * s)), max(1, round(wb * s))  # size of the whole image after resizing
    mask = mask[None]
    if cfg.train and crop is not None:
        out_h, out_w = min(crop[0], hs), min(crop[1], ws)
        win_h, win_w = max(1, round(out_h * h0 / hs)), max(1, round(out_w * w0 / ws))  # the crop, in source pixels
        top = int(torch.randint(0, h0 - win_h + 1, (1,), generator=g))
        left = int(torch.randint(0, w0 - win_w + 1, (1,), generator=g))
        image, mask = (
            image[..., top : top + win_h, left : left + win_w],
            mask[..., top : top + win_h, left : left + win_w],
        )
        image, mask = _resize_pair(image, mask, (out_h, out_w))
        pad_h, pad_w = crop[0] - out_h, crop[1] - out_w
        if pad_h or pad_w:  # pad right/bottom; padded pixels are ignored by the loss and the metrics
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
    else:
        if over_pixel_limit(hs * ws):  # a --scale of 100 would resize a photo to terapixels
            raise too_many_pixels(f"a {h0}x{w0} image resized (--size, --scale {s:.3g}) to", f"{hs}x{ws}", hs * ws)
        image, mask = _resize_pair(image, mask, (hs, ws))
    if cfg.train:
        if cfg.hflip and torch.rand(1, generator=g).item() < 0.5:
            image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
        if cfg.augment:
            image = colour_jitter(image, g)
    return image, mask[0].long()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 with ImageNet mean and std; run it on the device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1) * 255
    return images.to(torch.float32, copy=True).sub_(mean).div_(std)  # in place on the copy: 1.6 -> 0.1 ms at 512x1024


# ---- demo data: procedural desert scenes in the offroad layout ----------------------------------------------------


DEMO_SPLITS = {"train": 160, "val": 40}
DEMO_VERSION = 2  # bump when the scenes change, so cached copies are regenerated
DEMO_SIZE = (160, 224)  # H, W: small enough for a CPU, large enough for objects to survive output stride 16
# raw id -> base RGB colour of each demo class; the texture drawn on top differs per class too
DEMO_COLOURS = {
    100: (34, 85, 40),
    200: (70, 160, 55),
    300: (214, 196, 92),
    500: (128, 96, 58),
    550: (150, 140, 120),
    600: (90, 150, 70),
    700: (92, 58, 34),
    800: (128, 128, 134),
    7100: (205, 172, 122),
    10000: (110, 160, 220),
}


def _demo_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One desert scene: sky over a wavy horizon, sandy landscape, then objects painted far to near."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.28, 0.48) + h * 0.04 * np.sin(xx[0] / w * rng.uniform(3, 9) + rng.uniform(0, 6.3))
    ids = np.where(yy < horizon, 10000, 7100).astype(np.uint16)
    img = np.empty((h, w, 3), np.float32)
    sky = np.array(DEMO_COLOURS[10000]) + (yy / h)[..., None] * np.array([80.0, 60.0, 20.0])
    ground = np.array(DEMO_COLOURS[7100]) + rng.normal(0, 10, (h, w, 1)) * np.array([1.0, 0.9, 0.7])
    img[:] = np.where((ids == 10000)[..., None], sky, ground)

    objects = []  # (base y, raw id, centre x, radius y, radius x)
    for raw, count in ((300, 3), (800, 3), (700, 2), (500, 3), (200, 2), (100, 2), (600, 2), (550, 2)):
        for _ in range(rng.integers(0, count + 1)):
            cx = rng.uniform(0, w)
            top = float(horizon[int(min(cx, w - 1))])
            cy = rng.uniform(top - 0.05 * h, h) if raw != 100 else top + rng.uniform(-0.02, 0.08) * h
            scale = 0.8 + (cy - top) / max(h - top, 1)  # nearer objects are larger
            ry = {100: 0.18, 700: 0.05, 300: 0.09, 550: 0.09, 600: 0.09}.get(raw, 0.11) * h * scale
            rx = ry * {700: 5.0, 300: 2.5, 550: 1.8, 600: 1.6, 100: 0.8}.get(raw, 1.3)
            objects.append((cy + ry, raw, cx, cy, ry, rx))
    for _, raw, cx, cy, ry, rx in sorted(objects):
        wobble = 1 + 0.15 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(3, 7) + rng.uniform(0, 6.3))
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble**2
        if raw == 100:  # a tree: canopy plus trunk, both labelled Trees
            inside |= (np.abs(xx - cx) < rx * 0.15) & (yy > cy) & (yy < cy + 2.2 * ry)
        colour = np.array(DEMO_COLOURS[raw], np.float32)
        texture = rng.normal(0, 12, (h, w, 1))
        if raw == 600:  # flowers: magenta dots on green
            texture = np.where(rng.random((h, w, 1)) < 0.3, np.array([130.0, -70.0, 90.0]), texture)
        elif raw == 550:  # ground clutter: dark pebbles in grey debris
            texture = np.where(rng.random((h, w, 1)) < 0.35, -70.0, texture * 2)
        elif raw == 300:  # dry grass: vertical streaks
            texture = texture + 25 * np.sin(xx * 1.7)[..., None]
        img[inside] = colour + texture[inside]
        ids[inside] = raw
    img += rng.normal(0, 6, img.shape) + rng.uniform(-20, 20)  # sensor noise and exposure
    return np.clip(img, 0, 255).astype(np.uint8), ids


def make_demo(
    root: Path, seed: int = 0, splits: dict[str, int] = DEMO_SPLITS, size: tuple[int, int] = DEMO_SIZE
) -> Path:
    """Write the demo dataset (offroad layout, 16-bit raw-id masks) once; later calls reuse it."""
    root = Path(root)
    if (root / "COMPLETE").is_file():
        return root
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    for split_index, (split, n) in enumerate(splits.items()):
        (tmp / split / "Color_Images").mkdir(parents=True, exist_ok=True)
        (tmp / split / "Segmentation").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, ids = _demo_scene(np.random.default_rng([seed, split_index, i]), *size)
            Image.fromarray(image).save(tmp / split / "Color_Images" / f"{i:04d}.png")
            Image.fromarray(ids).save(tmp / split / "Segmentation" / f"{i:04d}.png")
    (tmp / "COMPLETE").write_text(f"demo data, seed {seed}\n")
    if root.exists():  # a crashed earlier attempt; the finished copy replaces it
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return root


def default_demo_root(seed: int) -> Path:
    return cache_root() / "deeplab_demo" / f"v{DEMO_VERSION}-seed{seed}"


# ---- the dataset: cache, sampler, samples, batches -----------------------------------------------------------------


def read_classes(path: Path, class_map: ClassMap) -> tuple[np.ndarray, int]:
    """A mask file as class indices [H, W] (uint8), and the number of its pixels whose value has no class."""
    return class_map.apply(read_mask(path, class_map.encoding == "colour"), is_lossy(path))


class DecodedCache:
    """A split's images and class-index masks, decoded once into two flat uint8 files that every epoch (and every
    DataLoader worker) then reads through np.memmap: no PNG decoding after the first pass."""

    def __init__(self, root: Path, pairs: list[tuple[Path, Path]], sizes: list[tuple[int, int]], class_map: ClassMap):
        self.root = root
        areas = np.array([w * h for w, h in sizes], dtype=np.int64)
        self.shapes = [(h, w) for w, h in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(areas)])
        self._images = self._masks = None
        if not (root / "COMPLETE").is_file():
            self._build(pairs, class_map)

    def _build(self, pairs: list[tuple[Path, Path]], class_map: ClassMap) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        total = int(self.offsets[-1])
        images = np.memmap(self.root / "images.u8", np.uint8, "w+", shape=(3 * total,))
        masks = np.memmap(self.root / "masks.u8", np.uint8, "w+", shape=(total,))
        for i, (image_path, mask_path) in enumerate(tqdm(pairs, desc=f"caching into {self.root}", disable=None)):
            a, b = self.offsets[i], self.offsets[i + 1]
            images[3 * a : 3 * b] = read_image(image_path).permute(1, 2, 0).numpy().ravel()
            masks[a:b] = read_classes(mask_path, class_map)[0].ravel()
        images.flush()
        masks.flush()
        (self.root / "COMPLETE").write_text(f"{len(pairs)} pairs\n")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        if self._images is None:  # opened lazily, so each DataLoader worker maps the files itself
            self._images = np.memmap(self.root / "images.u8", np.uint8, "r")
            self._masks = np.memmap(self.root / "masks.u8", np.uint8, "r")
        (h, w), a, b = self.shapes[index], self.offsets[index], self.offsets[index + 1]
        image = torch.from_numpy(np.array(self._images[3 * a : 3 * b]).reshape(h, w, 3)).permute(2, 0, 1)
        return image, np.array(self._masks[a:b]).reshape(h, w)


def cache_dir(pairs: list[tuple[Path, Path]], class_map: ClassMap) -> Path:
    """A cache folder named by the files (paths, sizes, modification times) and the class map."""
    digest = hashlib.sha1(repr(sorted(class_map.to_dict().items())).encode())
    for image, mask in pairs:
        for path in (image, mask):
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / "deeplab_decoded" / digest.hexdigest()[:16]


class EpochSampler(Sampler):
    """Wraps a sampler with set_epoch (DistributedSampler: its order is a function of seed and epoch) and yields
    (epoch, index), so that a sample's augmentation depends on nothing but (seed, epoch, index)."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SegmentationDataset(Dataset):
    """(image, mask) pairs of one split. File pairing and sizes are checked here, up front, so bad input
    fails before training starts and names the file. With cache=True the decoded split is kept on disk.
    `why` says, in words, how the masks are read (None when the class map was given)."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        class_map: ClassMap,
        transform: TransformConfig,
        cache: bool = False,
        seed: int = 0,
        why: str | None = None,
    ):
        sizes = []
        for image, mask in pairs:
            (iw, ih), (mw, mh) = image_size(image), image_size(mask)
            if (iw, ih) != (mw, mh):
                raise DatasetError(f"mask {mask} is {mw}x{mh} but image {image} is {iw}x{ih}")
            sizes.append((iw, ih))
        self.pairs, self.class_map, self.transform, self.why = pairs, class_map, transform, why
        self.cache = DecodedCache(cache_dir(pairs, class_map), pairs, sizes, class_map) if cache else None
        self.reported_unknown = False
        self.seed = seed
        self.about: list[str] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """key: an index, or (epoch, index) from an EpochSampler: then the sample's random transforms are seeded
        by (seed, epoch, index), the same in any DataLoader worker, on any rank and after a resume."""
        generator = None
        transform = self.transform
        if isinstance(key, tuple):
            epoch, key = key
            generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + key) % 2**63)
            transform = transform.at_epoch(epoch)
        if self.cache is not None:
            image, mask = self.cache[key]
            return transform_pair(image, torch.from_numpy(mask), transform, generator)
        image_path, mask_path = self.pairs[key]
        mask, unknown = read_classes(mask_path, self.class_map)
        if unknown and not self.reported_unknown:
            # once per dataset (and DataLoader worker), not per pixel: `--check` gives the exact counts
            self.reported_unknown = True
            print(
                f"warning: {unknown} pixels of {mask_path} have mask values outside the class table; "
                "they are ignored (255). `python dataset.py --check` counts them over the dataset.",
                file=sys.stderr,
            )
        return transform_pair(read_image(image_path), torch.from_numpy(mask), transform, generator)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a batch, padding images of different sizes (image with 0, mask with IGNORE_INDEX)."""
    h = max(image.shape[-2] for image, _ in batch)
    w = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros(len(batch), 3, h, w, dtype=batch[0][0].dtype)
    masks = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.long)
    for i, (image, mask) in enumerate(batch):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks


def open_data(data: Path | None, layout: str, seed: int = 0, val_fraction: float | None = None) -> DatasetTree:
    """open_tree of `data`; with no data folder (or layout 'demo') the demo data, generated first."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown --layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if data is None or layout == "demo":
        data = make_demo(data if data is not None else default_demo_root(seed), seed=seed)
        layout = "offroad"
    return open_tree(Path(data), layout, val_fraction)


def split_dataset(
    tree: DatasetTree,
    split: str,
    transform: TransformConfig,
    classes: ClassOptions | ClassMap = ClassOptions(),
    seed: int = 0,
    cache: bool = False,
) -> SegmentationDataset:
    """The dataset of one split of a tree. `classes`: what the user said about the classes, resolved against this
    split's masks, or the ClassMap of another split or of a checkpoint. `about` holds the lines that say how the
    data was read."""
    pairs = list_pairs(tree, split)
    if not pairs:
        raise DatasetError(f"split {tree.resolve(split)!r} of {tree.root} holds no images")
    if isinstance(classes, ClassMap):
        dataset = SegmentationDataset(pairs, classes, transform, cache, seed)
    else:
        class_map, why = resolve_class_map(tree.root, tree.layout, pairs, classes, tree.table, tree.encoding)
        dataset = SegmentationDataset(pairs, class_map, transform, cache, seed, why)
    dataset.about = [tree.describe(), *tree.notes, *(f"warning: {finding}" for finding in tree.findings)]
    return dataset


def build_dataset(
    data: Path | None,
    layout: str,
    split: str,
    transform: TransformConfig,
    classes: ClassOptions | ClassMap = ClassOptions(),
    seed: int = 0,
    cache: bool = False,
    val_fraction: float | None = None,
) -> SegmentationDataset:
    """The dataset of one split of the data at `data` (open_data, then split_dataset)."""
    return split_dataset(open_data(data, layout, seed, val_fraction), split, transform, classes, seed, cache)


# ---- statistics: what the masks of a split hold --------------------------------------------------------------------


@dataclass
class SplitStats:
    """What the masks of one split hold, counted over every pixel."""

    pixels: np.ndarray  # [C] pixels of each class
    images: np.ndarray  # [C] masks each class appears in
    ignored: int = 0  # pixels ignored: on purpose (IGNORE_INDEX, an `ignore` row) or for want of a class
    unknown: int = 0  # of those, pixels whose value has no class
    unknown_lossy: int = 0  # of those, pixels in lossy masks
    total: int = 0
    unknown_values: dict[int, list] = field(default_factory=dict)  # raw value -> [pixels, files]
    lossy: int = 0  # lossy (JPEG) masks
    unreadable: list[str] = field(default_factory=list)  # one message per file
    mismatched: list[str] = field(default_factory=list)  # masks of another size than their image

    def unreadable_line(self, where: str) -> str:
        """One line for every mask that does not decode: how many, and the first one's message (a split's masks
        are usually broken alike: a text-mode copy, a truncated download)."""
        if len(self.unreadable) == 1:
            return self.unreadable[0]
        return f"{len(self.unreadable)} masks of {where} cannot be read; the first: {self.unreadable[0]}"


def _pair_statistics(pair: tuple[Path, Path], class_map: ClassMap) -> tuple | str:
    image, mask = pair
    try:
        values, pixels, (mw, mh) = mask_values(mask, class_map.encoding == "colour")
    except DatasetError as e:
        return str(e)
    try:
        iw, ih = image_size(image)
    except DatasetError:  # named where images are read (the dataset's own checks, --check's leak search)
        iw, ih = mw, mh
    lossy = is_lossy(mask)
    counts, strange = class_map.count(values, pixels, lossy)
    mismatched = f"mask {mask} is {mw}x{mh} but image {image} is {iw}x{ih}" if (mw, mh) != (iw, ih) else None
    return counts, strange, lossy, mismatched


def split_statistics(pairs: list[tuple[Path, Path]], class_map: ClassMap, desc: str = "reading masks") -> SplitStats:
    """Pixels and images per class, ignored and unknown pixels, lossy, unreadable and mismatched masks of a split.
    Masks are decoded in threads (the decoders release the GIL)."""
    stats = SplitStats(np.zeros(class_map.num_classes, np.int64), np.zeros(class_map.num_classes, np.int64))
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = pool.map(lambda pair: _pair_statistics(pair, class_map), pairs)
        for (_, mask), result in zip(pairs, tqdm(results, total=len(pairs), desc=desc, leave=False, disable=None)):
            if isinstance(result, str):
                stats.unreadable.append(result)
                continue
            counts, strange, lossy, mismatched = result
            unknown = sum(strange.values())
            stats.pixels += counts[:-1]
            stats.images += counts[:-1] > 0
            stats.ignored += int(counts[-1])
            stats.unknown += unknown
            stats.total += int(counts.sum())
            stats.lossy += lossy
            stats.unknown_lossy += unknown if lossy else 0
            for value, n in {} if lossy else strange.items():  # lossy masks: compression noise, not values
                entry = stats.unknown_values.setdefault(value, [0, []])
                entry[0] += n
                entry[1].append(mask)
            if mismatched:
                stats.mismatched.append(mismatched)
    return stats


def too_few_classes(stats: SplitStats, class_map: ClassMap, where: str, pairs: list[tuple[Path, Path]]) -> str | None:
    """Why a split with at most one class present cannot train, or None when it has two or more. Masks that hold
    only 0 and 255 read as index masks (255: ignore) are the usual cause, and the message says so."""
    present = [name for name, n in zip(class_map.names, stats.pixels) if n > 0]
    if len(present) > 1:
        return None
    if class_map.encoding == "index" and detect_encoding(sample_masks(pairs), 2)[2] == 255:
        return (
            f"the masks of {where} hold only 0 and 255, and 255 is read as ignore, so only class 0 would be "
            "trained: pass --num-classes 2 (or --mask-encoding binary) to read 255 as the foreground"
        )
    what = f"only class {present[0]!r}" if present else "no class"
    return (
        f"{where} has {what} in its masks ({stats.ignored} of {stats.total} pixels ignored): nothing to learn; "
        "`python dataset.py --check` shows what the masks hold"
    )


def check_trainable(stats: SplitStats, class_map: ClassMap, where: str, pairs: list[tuple[Path, Path]]) -> list[str]:
    """Refuse (DatasetError) a training split that would train wrongly: unreadable masks, or at most one class
    present. One warning line per lesser problem: classes that never appear (they can never be learned), values
    outside the class table, lossy masks."""
    if stats.unreadable:
        raise DatasetError(stats.unreadable_line(where))
    problem = too_few_classes(stats, class_map, where, pairs)
    if problem:
        raise DatasetError(problem)
    warnings = [f"class {name!r} never appears in {where}: it can never be learned"
                for name, n in zip(class_map.names, stats.pixels) if n == 0]
    if stats.unknown > stats.unknown_lossy:
        warnings.append(
            f"{stats.unknown - stats.unknown_lossy:,} pixels of {where} have values outside {class_map.source}; "
            "they are ignored (`python dataset.py --check` lists them)"
        )
    if stats.lossy:
        warnings.append(
            f"{stats.lossy} masks of {where} are lossy (JPEG): {stats.unknown_lossy:,} of their pixels are no class's "
            "value (compression noise at edges) and are ignored; save masks as PNG"
        )
    return warnings


def class_weights(counts: np.ndarray, clip: tuple[float, float] = (0.1, 10.0)) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus 2015): w_c = median(f) / f_c over the classes present,
    clipped to `clip` so a rare class cannot dominate the loss; absent classes get weight 0."""
    freq = counts / max(counts.sum(), 1)
    present = counts > 0
    weights = np.zeros(len(counts))
    if present.any():
        weights[present] = np.clip(np.median(freq[present]) / freq[present], *clip)
    return weights


def enet_class_weights(counts: np.ndarray, c: float = 1.02) -> np.ndarray:
    """ENet's class weighting (Paszke et al. 2016, behind its 51.3 mIoU on CamVid): w_c = 1 / ln(c + f_c), f_c
    the class's share of the labelled pixels. Bounded by 1 / ln(c), it spreads the weights far less than median
    frequency balancing does (10x between CamVid's pole and road, against 35x); absent classes get weight 0."""
    freq = counts / max(counts.sum(), 1)
    return np.where(counts > 0, 1 / np.log(c + freq), 0.0)


WEIGHT_RULES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {  # --class-weights NAME: weights, rule
    "auto": (class_weights, "median frequency balancing, median(freq) / freq, clipped to [0.1, 10]; absent classes 0"),
    "enet": (enet_class_weights, "ENet's weighting, 1 / ln(1.02 + freq), at most 50.5; absent classes 0"),
}


def print_stats(dataset: SegmentationDataset) -> None:
    stats = split_statistics(dataset.pairs, dataset.class_map)
    columns = [weigh(stats.pixels) for weigh, _ in WEIGHT_RULES.values()]
    total = max(int(stats.pixels.sum()), 1)
    print(f"{'index':>5}  {'class':<20} {'pixels':>14} {'frequency':>10}" + "".join(f" {n:>8}" for n in WEIGHT_RULES))
    for i, name in enumerate(dataset.class_map.names):
        print(f"{i:>5}  {name:<20} {stats.pixels[i]:>14d} {stats.pixels[i] / total:>10.6f}"
              + "".join(f" {weights[i]:>8.4f}" for weights in columns))
    print(f"ignored pixels: {stats.ignored} ({stats.unknown} with values outside the class table)")
    print("weights (--class-weights): " + "; ".join(f"{n}, {rule}" for n, (_, rule) in WEIGHT_RULES.items()))


# ---- the dataset doctor: python dataset.py --data ROOT --check -----------------------------------------------------


def raw_histogram(pairs: list[tuple[Path, Path]], colour: bool) -> dict[int, list[int]]:
    """Every distinct raw value (colours packed by pack_rgb) in the masks of a split -> [pixels, masks]."""

    def histogram(mask: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            return mask_values(mask, colour)[:2]
        except DatasetError:  # split_statistics reports it
            return np.zeros(0, np.int64), np.zeros(0, np.int64)

    found: dict[int, list[int]] = {}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for values, counts in pool.map(histogram, [mask for _, mask in pairs]):
            for value, n in zip(values.tolist(), counts.tolist()):
                entry = found.setdefault(value, [0, 0])
                entry[0], entry[1] = entry[0] + n, entry[1] + 1
    return found


def value_name(value: int, colour: bool) -> str:
    return "({}, {}, {})".format(*unpack_rgb(value)) if colour else str(value)


def leaked_images(files: dict[str, SplitFiles]) -> tuple[list[str], list[str]]:
    """Decode every image: those whose pixels appear in more than one split, as 'A (split) = B (split)' lines, and
    the images that cannot be decoded, as error messages."""

    def digest(image: Path) -> str:
        try:
            pixels = read_image(image)
        except DatasetError as e:
            return f"error: {e}"
        return hashlib.sha1(str(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()).hexdigest()

    first: dict[str, tuple[str, Path]] = {}
    leaks, unreadable = [], []
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for split, split_files_ in files.items():
            images = [image for image, _ in split_files_.pairs]
            for image, key in zip(images, pool.map(digest, images)):
                if key.startswith("error: "):
                    unreadable.append(key.removeprefix("error: "))
                elif key in first and first[key][0] != split:
                    leaks.append(f"{first[key][1]} ({first[key][0]}) = {image} ({split})")
                first.setdefault(key, (split, image))
    return leaks, unreadable


def write_class_table(
    path: Path, found: dict[int, list[int]], colour: bool, lossy: bool, source: str, class_map: ClassMap | None
) -> None:
    """A class table of the values the masks hold, each row with its pixel count as a comment, for the user to
    name; rows take their names from `class_map` where it knows the value. Lossy masks: only values that hold at
    least 0.1% of the pixels (the rest is compression noise)."""
    if path.exists():
        raise DatasetError(f"--write-classes {path} exists; choose another name (it is never overwritten)")
    total = sum(n for n, _ in found.values())
    keep = sorted(v for v, (n, _) in found.items() if not lossy or n >= 0.001 * total)
    if colour:
        keep.sort(key=lambda v: -found[v][0])
    lines = [f"# class table of the masks of {source}, written by `dataset.py --check`: rename the classes (rows in",
             "# class-index order), give rows one name to merge them, and name a row `ignore` for a value of no class",
             "name,r,g,b" if colour else "name,id"]
    for i, value in enumerate(keep):
        pixels, masks = found[value]
        name = f"class_{i}" if colour else "ignore" if value == IGNORE_INDEX else f"class_{value}"
        if class_map is not None:
            index, known = (int(a[0]) for a in class_map.lookup(np.array([value])))
            name = ("ignore" if index == IGNORE_INDEX else class_map.names[index]) if known else name
        lines.append(f"# {value_name(value, colour)}: {pixels} pixels in {masks} masks")
        lines.append(f"{name},{','.join(map(str, unpack_rgb(value)))}" if colour else f"{name},{value}")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}: {len(keep)} rows{f' of {len(found)} values' if len(keep) < len(found) else ''}; name them")


def print_class_rows(class_map: ClassMap, stats: dict[str, SplitStats]) -> None:
    """Per class and split: pixels, share of the labelled pixels, and the masks it appears in."""
    head = "".join(f" | {s + ' pixels':>15} {'share':>7} {'masks':>6}" for s in stats)
    print(f"{'':>3} {'class':<20}{head}")
    for i, name in enumerate(class_map.names):
        cells = "".join(
            f" | {s.pixels[i]:>15,} {s.pixels[i] / max(s.pixels.sum(), 1):>7.2%} {s.images[i]:>6}"
            for s in stats.values()
        )
        print(f"{i:>3} {name[:20]:<20}{cells}")
    ignored = (
        f"{s} {v.ignored:,} ({v.ignored / max(v.total, 1):.1%}; {v.unknown:,} of no class)" for s, v in stats.items()
    )
    print(f"ignored pixels: {', '.join(ignored)}")


def split_findings(split: str, files: SplitFiles, stats: SplitStats, class_map: ClassMap, colour: bool,
                   train: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) of one split, each one line."""

    def some(items: list) -> str:
        return ", ".join(map(str, items[:5])) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    errors = [stats.unreadable_line(f"split {split}")] if stats.unreadable else []
    errors += stats.mismatched[:5]
    if files.images_without_mask:
        errors.append(f"{split}: {len(files.images_without_mask)} images have no mask: "
                      + some([image.name for image, _ in files.images_without_mask]))
    if stats.total and stats.ignored == stats.total:
        errors.append(f"{split}: every pixel is ignored")
    warnings = []
    if files.masks_without_image:
        warnings.append(f"{split}: {len(files.masks_without_image)} masks have no image: "
                        + some([m.name for m in files.masks_without_image]))
    if stats.total / 2 < stats.ignored < stats.total:
        warnings.append(f"{split}: {stats.ignored / stats.total:.0%} of the pixels are ignored")
    absent = [n for n, p in zip(class_map.names, stats.pixels) if p == 0]
    if absent and split == train:
        warnings.append(f"{split}: never present, so never learned: {', '.join(absent)}")
    elif absent:
        warnings.append(f"{split}: never present, so their IoU is n/a: {', '.join(absent)}")
    if stats.lossy:
        warnings.append(f"{split}: {stats.lossy} masks are lossy (JPEG); {stats.unknown_lossy:,} of their pixels "
                        "match no class (compression noise) and are ignored; save masks as PNG")
    for value, (pixels, masks) in sorted(stats.unknown_values.items(), key=lambda kv: -kv[1][0])[:5]:
        warnings.append(f"{split}: value {value_name(value, colour)} is in no class: {pixels:,} pixels in "
                        + some([m.name for m in masks]))
    if len(stats.unknown_values) > 5:
        warnings.append(f"{split}: {len(stats.unknown_values) - 5} more values are in no class")
    return errors, warnings


def train_command(root: Path, layout: str, options: ClassOptions, val_fraction: float | None = None) -> str:
    """The train_deeplab.py command line for these data flags."""
    parts = ["python", "train_deeplab.py", "--data", str(root)] + (["--layout", layout] if layout != "auto" else [])
    parts += ["--val-fraction", str(val_fraction)] if val_fraction is not None else []
    if options.table is not None:
        parts += ["--classes", str(options.table)]
    elif options.num_classes is not None:
        parts += ["--num-classes", str(options.num_classes)]
    if options.names:
        parts += ["--class-names", ",".join(options.names)]
    if options.encoding != "auto":
        parts += ["--mask-encoding", options.encoding]
    return shlex.join(parts)


def doctor_class_map(
    tree: DatasetTree, pairs: list[tuple[Path, Path]], options: ClassOptions, warnings: list[str]
) -> tuple[ClassMap | None, str, ClassOptions]:
    """resolve_class_map, or for id masks without a class count every value as a class (with a warning), or None
    for colour masks without a table; also the options that the train command line needs."""
    try:
        class_map, why = resolve_class_map(tree.root, tree.layout, pairs, options, tree.table, tree.encoding)
        return class_map, why, options
    except ClassesUnknown as e:
        if e.encoding == "colour":
            return None, str(e), options
    values = [v for v in raw_histogram(pairs, colour=False) if v != IGNORE_INDEX]
    options = replace(options, num_classes=max(values, default=0) + 1)
    warnings.append(
        f"no --num-classes or --classes: the mask values 0..{options.num_classes - 1} were counted as classes (255 "
        "as ignore); if a value means void (like 11 in CamVid), pass the real --num-classes, or a class table "
        "with an `ignore` row"
    )
    class_map, why = resolve_class_map(tree.root, tree.layout, pairs, options, tree.table, tree.encoding)
    return class_map, why, options


def checked_splits(tree: DatasetTree) -> tuple[dict[str, SplitFiles], str]:
    """The splits --check reads (VOC's trainval, where it is the union of train and val, is not read twice) and
    the training split among them."""
    files = {s: f for s, f in tree.splits.items() if s not in tree.unions}
    with_pairs = [s for s, f in files.items() if f.pairs]
    if not with_pairs:
        raise DatasetError(f"{tree.root} holds no image with a mask" + "".join(f"; {note}" for note in tree.notes))
    try:
        train = tree.resolve("train")
    except DatasetError:
        train = with_pairs[0]
    return files, train if train in with_pairs else with_pairs[0]


def check_dataset(root: Path, layout: str, options: ClassOptions, write_classes: Path | None = None,
                  val_fraction: float | None = None) -> int:
    """Print what a dataset holds and what would go wrong in training, then a verdict and the command line to
    train with. Returns 1 when training would fail or train wrongly, else 0."""
    tree = open_tree(root, layout, val_fraction)
    files, train = checked_splits(tree)
    print(f"{root}: {tree.describe()}")
    for note in tree.notes:
        print(note)
    errors, warnings = [], list(tree.findings)
    class_map, why, options = doctor_class_map(tree, files[train].pairs, options, warnings)
    colour = class_map.encoding == "colour" if class_map else True
    if write_classes is not None:
        lossy = any(is_lossy(mask) for _, mask in files[train].pairs)
        found = raw_histogram(files[train].pairs, colour)
        write_class_table(write_classes, found, colour, lossy, f"{tree.root / train}", class_map)
        options = replace(options, table=write_classes)
        if class_map is None:  # read the masks with the table just written
            class_map, why, options = doctor_class_map(tree, files[train].pairs, options, warnings)
    if class_map is None:
        errors.append(why)
    else:
        print(f"masks: {class_map.encoding}, {class_map.num_classes} classes from {class_map.source} ({why})")
        stats = {s: split_statistics(f.pairs, class_map, f"reading {s} masks") for s, f in files.items() if f.pairs}
        print_class_rows(class_map, stats)
        for split, split_stats in stats.items():
            found_errors, found_warnings = split_findings(split, files[split], split_stats, class_map, colour, train)
            errors, warnings = errors + found_errors, warnings + found_warnings
        problem = too_few_classes(stats[train], class_map, f"split {train}", files[train].pairs)
        errors += [problem] if problem else []
    leaks, broken = leaked_images(files)
    errors += [f"{len(broken)} images cannot be read; the first: {broken[0]}" if len(broken) > 1 else broken[0]
               ] if broken else []
    warnings += [f"the same image is in two splits (leakage inflates validation scores): {leak}" for leak in leaks]
    for line in [*(f"error: {e}" for e in errors), *(f"warning: {w}" for w in warnings)]:
        print(line)
    command = train_command(root, layout, options, val_fraction)
    if errors:
        print(
            f"verdict: training would fail or train wrongly ({len(errors)} errors); once they are fixed:\n  {command}"
        )
    else:
        print(f"verdict: ready to train ({len(warnings)} warnings)\n  {command}")
    return 1 if errors else 0


# ---- command line --------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage block) with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def number(kind: type, least: float, most: float = math.inf, above: bool = False, below: bool = False
           ) -> Callable[[str], int | float]:
    """A parser type: a flag's value as `kind` (int or float) from `least` to `most` (above, below: excluding
    them), refused when the flags are parsed, so that no run starts, or fails hours in, on a value that means
    nothing."""
    whole = "a whole number" if kind is int else "a number"
    bounds = f"over {least:g}" if above else f"{least:g} or more"
    bounds += f" and {'below' if below else 'at most'} {most:g}" if most < math.inf else ""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {whole} {bounds}, got {text!r}") from None
        if not (math.isfinite(value) and (value > least if above else value >= least)
                and (value < most if below else value <= most)):
            raise argparse.ArgumentTypeError(f"expected {whole} {bounds}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} {bounds}"
    return parse


POSITIVE_INT, COUNT = number(int, 0, above=True), number(int, 0)  # COUNT: 0 allowed (0 workers, no patience)
POSITIVE, NON_NEGATIVE = number(float, 0, above=True), number(float, 0)


class HeightWidth(argparse.Action):
    """`--crop 512` (a square) or `--crop 512 1024` (H W): one or two values, each checked by the flag's type."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: list,
                 option_string: str | None = None) -> None:
        if len(values) > 2 or ("off" in values and len(values) > 1):
            parser.error(f"argument {option_string}: takes H W or one size, got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, values)


class Ascending(argparse.Action):
    """`--scale MIN MAX`: MIN no more than MAX."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: list,
                 option_string: str | None = None) -> None:
        if values[0] > values[1]:
            parser.error(f"argument {option_string}: MIN {values[0]:g} is above MAX {values[1]:g}")
        setattr(namespace, self.dest, values)


def one_line(error: Exception) -> str:
    """The message of an error as one line. An error raised in a DataLoader worker reaches the main process
    wrapped with the worker's traceback; its own message is the last line there."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1].split(": ", 1)[1] if "Traceback" in str(error) and ": " in lines[-1] else lines[-1]


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is the CPU allocator's refusal (torch raises it as a RuntimeError naming the allocator)."""
    return isinstance(error, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def cannot_write(path: Path, error: BaseException) -> DatasetError:
    """The one line for a file that cannot be written; a full disk is named as such (torch.save reports it as a
    failed write, with no reason)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < FULL_DISK):
        why = "no space left on device" + (f" ({free / 2**20:.0f} MiB free)" if free is not None else "")
    else:
        why = getattr(error, "strerror", None) or one_line(error)
    return DatasetError(f"cannot write {path}: {why}")


def writable_folder(path: Path, flag: str, named: Path | None = None) -> Path:
    """`path`, checked to be a folder this process can write into, or one it can make (nothing is made here):
    checked before any work is done, so that a run does not fail at its first write, an hour in. The message
    names the flag's own value, `named` (a file in `path`) where given."""
    named = named or path
    existing = next(p for p in [path, *path.parents] if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise DatasetError(f"{flag} {named} is no folder" if existing == named else
                           f"{flag} {named}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise DatasetError(f"{flag} {named}: cannot write in {existing} ({e.strerror or e})") from None
    return path


def writable_file(path: Path, flag: str) -> Path:
    """`path`, checked to be a file this process can write (in a folder that is, or can be made)."""
    if path.is_dir():
        raise DatasetError(f"{flag} {path} is a folder; give a file name")
    writable_folder(path.parent, flag, path)
    return path


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Flags that pick a dataset and say what its masks mean, shared by every script."""
    parser.add_argument(
        "--data", type=Path, default=None, help="dataset root or an export's .zip (default: the generated demo data)"
    )
    parser.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout (default: detect)")
    parser.add_argument(
        "--classes", type=Path, default=None, metavar="CSV", help="class table: name[,id][,r,g,b] per class"
    )
    parser.add_argument(
        "--mask-encoding", default="auto", choices=ENCODINGS, help="how masks hold classes (default: detect)"
    )
    parser.add_argument("--num-classes", type=POSITIVE_INT, default=None, help="number of classes (ids 0..N-1)")
    parser.add_argument(
        "--class-names", type=lambda s: [n.strip() for n in s.split(",")], default=None, help="comma-separated names"
    )
    parser.add_argument(
        "--val-fraction", type=number(float, 0, 1, above=True, below=True), default=None, metavar="F",
        help=f"data without a validation split: hold out this share of the training images as val (default "
        f"{DEFAULT_VAL_FRACTION}, chosen by a hash of each file name)",
    )
    parser.add_argument("--seed", type=COUNT, default=0, help="random seed (also picks the demo data)")
    parser.add_argument(
        "--max-pixels", type=POSITIVE_INT, default=PIXEL_LIMIT, metavar="N",
        help=f"refuse an image or mask of more pixels, as a decompression bomb (default: Pillow's {PIXEL_LIMIT:,})",
    )
    parser.add_argument(
        "--cache", action="store_true", help="decode each split once into uint8 files under ~/.cache/deeplab_decoded"
    )


def add_transform_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the training transforms (train_deeplab.py's)."""
    parser.add_argument("--size", type=POSITIVE_INT, nargs="+", action=HeightWidth, default=None, metavar="H W",
                        help="resize to H W (default: keep)")
    parser.add_argument("--crop", type=POSITIVE_INT, nargs="+", action=HeightWidth, default=None, metavar="H W",
                        help="random crop (one value: square)")
    parser.add_argument("--scale", type=POSITIVE, nargs=2, action=Ascending, default=None, metavar=("MIN", "MAX"),
                        help="random scale range")
    parser.add_argument("--augment", action="store_true", help="colour jitter")
    parser.add_argument("--low-res-epochs", type=COUNT, default=0, metavar="N",
                        help="progressive resizing: train epochs 1..N at half --size and --crop (a quarter of the "
                             "pixels), the rest and validation at full (default 0)")


def hw_pair(values: list[int] | None, flag: str = "--size") -> tuple[int, int] | None:
    """`--crop 512` means 512x512; `--crop 512 1024` is H x W."""
    if values is None:
        return None
    if len(values) > 2 or min(values) <= 0:
        raise DatasetError(f"{flag} takes one or two positive sizes (H W), got {' '.join(map(str, values))}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def within_pixel_limit(hw: tuple[int, int] | None, flag: str) -> tuple[int, int] | None:
    """A flag's (H, W), refused before any work where it has more pixels than an image may have."""
    if hw and over_pixel_limit(hw[0] * hw[1]):
        raise too_many_pixels(flag, f"{hw[0]} {hw[1]}", hw[0] * hw[1])
    return hw


def transform_from_args(args: argparse.Namespace, train: bool) -> TransformConfig:
    """The TransformConfig that add_transform_args's flags describe (train=False: the resize alone); a --size or
    --crop of more pixels than the pixel limit is refused before any work."""
    scale = tuple(args.scale) if args.scale else None
    size = within_pixel_limit(hw_pair(args.size), "--size")
    crop = within_pixel_limit(hw_pair(args.crop, "--crop"), "--crop")
    return TransformConfig(size, scale, crop, augment=args.augment, train=train,
                           low_res_epochs=args.low_res_epochs)


def main(args: argparse.Namespace) -> None:
    set_pixel_limit(args.max_pixels)
    try:
        options = ClassOptions.from_args(args)
        if args.check or args.write_classes:
            data = args.data if args.data is not None and args.layout != "demo" else None
            root = data if data is not None else make_demo(args.data or default_demo_root(args.seed), seed=args.seed)
            layout = args.layout if data is not None else "auto"
            sys.exit(check_dataset(Path(root), layout, options, args.write_classes, args.val_fraction))
        dataset = build_dataset(
            args.data, args.layout, args.split, TransformConfig(train=False), options, args.seed, args.cache,
            args.val_fraction,
        )
        print("\n".join(dataset.about))
        print(f"{len(dataset)} images in split {args.split!r}, {dataset.class_map.num_classes} classes")
        print(f"masks: {dataset.class_map.encoding}, classes from {dataset.class_map.source} ({dataset.why})")
        if args.stats:
            print_stats(dataset)
    except DatasetError as e:
        sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Inspect a segmentation dataset", add_help=add_help)
    add_data_args(parser)
    parser.add_argument("--check", action="store_true", help="check every split; exit 1 if training would be wrong")
    parser.add_argument(
        "--write-classes", type=Path, default=None, metavar="CSV", help="with --check: write a class table to name"
    )
    parser.add_argument("--split", default="train", help="split to read (train, val, ...)")
    parser.add_argument("--stats", action="store_true", help="print per-class pixel counts and suggested weights")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
