"""The annotation tools' exports, one section per tool, each read as the tool's own exporter writes it.

Every reader returns a DatasetTree: the (image, mask) pairs of each split, the export's class table, and what it
skipped and why. Trees of masks (VOC, CVAT's "Segmentation mask", labelme2voc, Roboflow's masks) pair the files
they hold; exports of shapes (COCO, CVAT's XML, LabelMe's JSON, YOLO, VIA, Label Studio) are rasterised once, by
one rasteriser (region_pixels: polygons filled as COCO fills them, with pycocotools, which the tools' own COCO
exports assume, or with their edges, as LabelMe and Ultralytics fill theirs), into PNG masks in a cache named by a
digest of the export, so epochs cost what PNG masks cost; the tree read is kept too, so a second open parses
nothing.

    from annotations import TOOL_READERS, detect_tool
    tree = TOOL_READERS[detect_tool(root)](root)
"""

import base64
import csv
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import stat
import urllib.parse
import warnings
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

IGNORE_INDEX = 255
# Pillow's formats with no decoder of their own (stubs, a ghostscript or Windows call, MPEG's header only)
UNDECODED_FORMATS = ("BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS")
EXIF_ORIENTATION = 0x0112  # the tag a phone writes instead of turning the pixels of a photo taken upright
VALIDATION_NAMES = ("val", "valid", "validation")  # Roboflow calls it valid
SPLIT_NAMES = ("train", "training", *VALIDATION_NAMES, "test", "testing")  # folders read as splits by name alone


class DatasetError(Exception):
    """Bad input (data, or a place to write): the message names the file, folder or flag and is shown to the user
    as one line."""


# ---- what every reader returns: a class table, the files of each split, what was skipped ---------------------------


def is_ignore(name: str) -> bool:
    return name.strip().lower() == "ignore"


@dataclass(frozen=True)
class ClassRow:
    """One row of a class table: a class name (or "ignore"), and the raw id and/or colour that mean it."""

    name: str
    id: int | None = None
    colour: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class ClassTable:
    """Classes in index order, each named once; several rows of one name merge their ids or colours into one
    class, and rows named `ignore` mark values that mean "ignore". Without ids, class i has id i."""

    rows: tuple[ClassRow, ...]
    source: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.name for r in self.rows if not is_ignore(r.name)))

    @property
    def has_ids(self) -> bool:
        return any(r.id is not None for r in self.rows)

    @property
    def has_colours(self) -> bool:
        return any(r.colour is not None for r in self.rows)


@dataclass
class SplitFiles:
    """The (image, mask) pairs of one split, and the files that have no partner."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    images_without_mask: list[tuple[Path, Path]] = field(default_factory=list)  # (image, the mask it expects)
    masks_without_image: list[Path] = field(default_factory=list)


@dataclass
class DatasetTree:
    """A dataset root as its layout reads it: the files of every split, the layout's own class table and mask
    encoding ("auto": the masks say), what the tree gets wrong (`findings`, one line each), what was done on the
    user's behalf (`notes`: unzipped, frames skipped, a validation split held out), and the splits that are only
    the union of others (VOC's trainval, when it is train + val)."""

    root: Path
    layout: str
    splits: dict[str, SplitFiles]
    table: ClassTable | None = None
    encoding: str = "auto"
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unions: set[str] = field(default_factory=set)

    def resolve(self, split: str) -> str:
        """A split by name; `val` also finds valid or validation, and `train` the one split of a tree whose only
        split is not train (CVAT's `default`)."""
        if split in self.splits:
            return split
        by_name = {s.lower(): s for s in self.splits}  # CVAT's subsets are Train, Validation, Test
        if split.lower() in by_name:
            return by_name[split.lower()]
        found = [by_name[s] for s in VALIDATION_NAMES if s in by_name] if split == "val" else []
        others = [s for s in self.splits if s.lower() not in (*VALIDATION_NAMES, "test", *self.unions)]
        found += others if split == "train" and len(others) == 1 else []
        if not found:
            names, notes = ", ".join(self.splits) or "none", "".join(f"; {note}" for note in self.notes)
            raise DatasetError(f"{self.root} (layout {self.layout}) has no split {split!r}; its splits: {names}{notes}")
        return found[0]

    def describe(self) -> str:
        """One line: `layout cvat: labelmap.txt with 12 labels, splits train (12) and val (4)`."""
        counts = [f"{s} ({len(f.pairs)})" for s, f in self.splits.items()]
        listed = ", ".join(counts[:-1]) + f" and {counts[-1]}" if len(counts) > 1 else "".join(counts) or "none"
        table = f"{self.table.source}, " if self.table is not None else ""
        return f"layout {self.layout}: {table}split{'s' if len(counts) > 1 else ''} {listed}"


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of a text file, blank lines and # comments left out."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    return [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]


def read_json(path: Path) -> tuple[object, bytes]:
    try:
        raw = path.read_bytes()
        return json.loads(raw), raw
    except (OSError, ValueError, RecursionError) as e:
        raise DatasetError(f"cannot read {path}: {str(e)[:200]}") from None


@contextmanager
def malformed(where: str) -> Iterator[None]:
    """What a malformed export makes its parsing raise (a string where a number belongs, a list where an object
    does) as one line naming the file, or the image, it is in."""
    try:
        yield
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise DatasetError(f"{where}: not as the tool writes it ({type(e).__name__}: {str(e)[:120]})") from None


def some(items: list) -> str:
    """The first five of a list, and how many more."""
    return ", ".join(map(str, items[:5])) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


# ---- files: the suffixes Pillow reads, sizes as displayed, pairing by name -----------------------------------------


def readable_suffixes() -> tuple[str, ...]:
    """Every file suffix Pillow opens and decodes, for images and masks alike (GIF masks as DRIVE ships them,
    PPM/PGM, TIFF, ...)."""
    Image.init()
    extensions = Image.registered_extensions().items()
    return tuple(sorted(e for e, f in extensions if f in Image.OPEN and f not in UNDECODED_FORMATS))


IMAGE_SUFFIXES = readable_suffixes()


def orientation(im: Image.Image) -> int:
    """An opened image's EXIF orientation, 1 (as stored) to 8. A PNG's comes only from an eXIf chunk before its
    pixels, the one Pillow's open sees, so that reading a PNG's size never decodes it; a broken EXIF block counts
    as no tag."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # Pillow raises many kinds for a malformed block; a photo is not refused for one
        return 1
    return value if value in range(1, 9) else 1


PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit, 89,478,485 px (a 9459 x 9459 square)


def set_pixel_limit(pixels: int, worker: int | None = None) -> None:
    """The most pixels (width x height) an image or mask of this process may have: `--max-pixels`. It is Pillow's
    own setting, so every decode obeys it; above it, open_image refuses a file in one line (not Pillow's warning,
    then a decode that can exhaust memory). `worker`: the id a DataLoader passes its worker_init_fn."""
    Image.MAX_IMAGE_PIXELS = pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def pixel_limit_for_workers() -> Callable[[int], None]:
    """A DataLoader's worker_init_fn that gives its workers this process's pixel limit: a worker started by spawn
    or forkserver (macOS, Windows, Python 3.14's Linux default) imports Pillow anew, with its default."""
    return partial(set_pixel_limit, Image.MAX_IMAGE_PIXELS)


def over_pixel_limit(pixels: int) -> bool:
    """More pixels than an image of this process may have (set_pixel_limit; Pillow's None: no limit)."""
    return pixels > (Image.MAX_IMAGE_PIXELS or math.inf)


def too_many_pixels(what: str, path: Path | str, pixels: int) -> DatasetError:
    return DatasetError(f"{what} {path} has {pixels:,} pixels, over the limit of {Image.MAX_IMAGE_PIXELS:,} (a guard "
                        f"against decompression bombs; --max-pixels {pixels} raises it)")


def open_image(path: Path | str, data: bytes | None = None, what: str = "image") -> Image.Image:
    """Pillow's lazy open of a file (or of its bytes, `data`), which reads the header alone; a file of more
    pixels than the limit (set_pixel_limit) is refused before any of its pixels is decoded."""
    try:
        im = Image.open(path if data is None else io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise too_many_pixels(what, path, int(found[1]) if found else 0) from None
    if over_pixel_limit(im.width * im.height):
        im.close()
        raise too_many_pixels(what, path, im.width * im.height)
    return im


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is displayed: swapped for the EXIF orientations that turn it a quarter."""
    return im.size[::-1] if orientation(im) in (5, 6, 7, 8) else im.size


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (as annotation tools show a photo), from the file header, without decoding."""
    try:
        with open_image(path) as im:
            return displayed_size(im)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None


def images_by_stem(folder: Path, recursive: bool = False) -> dict[str, Path]:
    """The image files of a folder by name without suffix (a path relative to the folder when recursive); the
    first of two files of one stem wins."""
    files = sorted(folder.rglob("*") if recursive else folder.iterdir()) if folder.is_dir() else []
    found: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return found


def pair_by_stem(images: dict[str, Path], masks: dict[str, Path], mask_dir: Path, suffix: str = "") -> SplitFiles:
    """Each image with the mask of its stem (plus `suffix`: Roboflow's `_mask`), in a stable order."""
    files = SplitFiles()
    masks = dict(masks)
    for stem, image in sorted(images.items()):
        mask = masks.pop(stem + suffix, None)
        if mask is None:
            files.images_without_mask.append((image, mask_dir / f"{stem}{suffix}.png"))
        else:
            files.pairs.append((image, mask))
    files.masks_without_image = sorted(masks.values())
    return files


def find_image(name: str, folders: Iterable[Path], below: dict[str, list[Path]] | None = None) -> Path | None:
    """The file an export names (`images/a.jpg`, `C:\\data\\a.jpg`, `a.jpg`) in the first folder that has it, by its
    path and then by its file name alone; else, with `below` (images_below), the one image of that file name
    anywhere below the export."""
    name = name.replace("\\", "/")
    folders = list(folders)
    for candidate in [f / name for f in folders] + [f / PurePosixPath(name).name for f in folders]:
        if candidate.is_file():
            return candidate
    elsewhere = (below or {}).get(PurePosixPath(name).name, [])
    return elsewhere[0] if len(elsewhere) == 1 else None


def images_below(root: Path) -> dict[str, list[Path]]:
    """Every image file below `root` by its file name: where an export's images sit in a folder of their own."""
    found: dict[str, list[Path]] = {}
    for path in images_by_stem(root, recursive=True).values():
        found.setdefault(path.name, []).append(path)
    return found


# ---- shapes to masks: one rasteriser, a cache by digest -------------------------------------------------------------

MASKS_VERSION = 3  # bump when rasterising changes, so cached masks are made anew
LABELME_POINT_RADIUS, LABELME_LINE_WIDTH = 5, 10  # LabelMe's shape_to_mask: point_size and line_width


@dataclass
class Region:
    """One annotated region, a class `value` and its pixels as polygons (flat [x0, y0, x1, y1, ...] in pixels,
    filled as COCO does), a COCO RLE, a bitmap [h, w] whose top-left pixel is (left, top), a `drawing` (kind,
    points) filled with its edges, as LabelMe and Ultralytics fill, or a bitmap to `decode` when rasterised."""

    value: int
    polygons: list[list[float]] | None = None
    rle: dict | None = None
    bitmap: np.ndarray | None = None
    left: int = 0
    top: int = 0
    drawing: tuple[str, list[tuple[float, float]]] | None = None
    decode: Callable[[int, int], np.ndarray] | None = None  # (height, width) -> its bitmap, made when rasterised


@dataclass
class Annotated:
    """An image of a shape export: the name the export gives it, where it is, its size, and its regions in the
    order the tool paints them (later on top)."""

    name: str
    image: Path | None
    height: int
    width: int
    regions: list[Region]
    background: bool = False  # an image the tool says is background only (YOLO's empty label file)


@dataclass
class ShapeSplit:
    """What a shape export's reader hands the rasteriser for one split: its images and what it skipped."""

    images: list[Annotated] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, points: int = 64) -> list[float]:
    """A polygon of `points` vertices around an ellipse (radii rx, ry, turned `angle` radians)."""
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    xy = np.stack([cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle)], 1)
    return xy.ravel().tolist()


def box_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def region_pixels(region: Region, height: int, width: int) -> np.ndarray:
    """A region as a boolean mask [height, width]: polygons and RLE by pycocotools, bitmaps placed (and clipped)."""
    from pycocotools import mask as mask_utils

    if region.drawing is not None:
        return drawn(*region.drawing, height, width)
    if region.decode is not None:
        return region.decode(height, width)
    if region.bitmap is not None:
        full = np.zeros((height, width), bool)
        top, left = max(region.top, 0), max(region.left, 0)
        crop = region.bitmap[top - region.top:height - region.top, left - region.left:width - region.left]
        full[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
        return full
    if region.polygons is not None:
        for polygon in region.polygons:
            check_points(np.asarray(polygon, float).reshape(-1, 2), height, width)
        rle = mask_utils.merge(mask_utils.frPyObjects(region.polygons, height, width))
    else:
        counts = region.rle.get("counts")
        rle = mask_utils.frPyObjects(region.rle, height, width) if isinstance(counts, list) else region.rle
    return mask_utils.decode(rle).astype(bool)


def check_points(xy: np.ndarray, height: int, width: int) -> None:
    """Refuse (ValueError) a shape's points [N, 2] that are no numbers, or over a whole image's size outside it: no
    tool draws there, and pycocotools draws every edge, whatever its length, before it clips (a 1e12 vertex makes
    5e12 points). YOLO's normalised coordinates past 1 (Ultralytics refuses such a label file) land here too."""
    outside = ~(np.isfinite(xy) & (xy >= -np.array([width, height])) & (xy <= 2 * np.array([width, height])))
    if outside.any():
        x, y = xy[outside.any(1)][0]
        raise ValueError(f"a shape has the point ({x:g}, {y:g}), over a whole image's size outside the "
                         f"{width}x{height} image")


def drawn(kind: str, xy: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """A shape as LabelMe's shape_to_mask draws it with Pillow: outline and fill, lines LABELME_LINE_WIDTH wide."""
    check_points(np.asarray(xy, float).reshape(-1, 2), height, width)
    canvas = Image.new("L", (width, height))
    draw = ImageDraw.Draw(canvas)
    if kind == "ellipse":
        draw.ellipse(xy, outline=1, fill=1)
    elif kind == "rectangle":
        draw.rectangle(xy, outline=1, fill=1)
    elif kind in ("line", "linestrip"):
        draw.line(xy, fill=1, width=LABELME_LINE_WIDTH, **({"joint": "curve"} if kind == "linestrip" else {}))
    else:
        draw.polygon(xy, outline=1, fill=1)
    return np.asarray(canvas, bool)


def paint(annotated: Annotated, ignore: int, overlap_ignored: bool) -> tuple[np.ndarray, int]:
    """One image's mask of class values: background 0, each region painted over the ones before it, or (COCO,
    `overlap_ignored`) pixels that regions of different classes share set to `ignore`; and those pixels' count."""
    mask = np.zeros((annotated.height, annotated.width), np.uint8 if ignore == IGNORE_INDEX else np.uint16)
    for region in annotated.regions:
        covered = region_pixels(region, annotated.height, annotated.width)
        if overlap_ignored:
            clash = covered & (mask != 0) & (mask != region.value)
            mask[covered & (mask == 0)] = region.value
            mask[clash] = ignore
        else:
            mask[covered] = region.value
    return mask, int(np.count_nonzero(mask == ignore)) if overlap_ignored else 0


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))


def digest_of(parts: Iterable[bytes]) -> str:
    """The cache key of an export: a digest of the bytes its reader read, and of the rasteriser's version."""
    sha = hashlib.sha1(f"masks {MASKS_VERSION}".encode())
    for part in parts:
        sha.update(hashlib.sha1(part).digest())
    return sha.hexdigest()[:16]


def rasterise(label: str, digest: str, images: list[Annotated], ignore: int,
              overlap_ignored: bool = False) -> tuple[Path, list[tuple[str, int] | None]]:
    """Every image's mask as a PNG, written once into a cache folder named by `digest` (files numbered, so no name
    in an export can leave the folder), with the pixels each lost to overlaps; later runs read both back.
    Another process of the same run (torchrun) may rasterise at the same time: the first to finish wins."""
    folder = cache_root() / "deeplab_masks" / digest
    if (folder / "found.json").is_file():
        return folder, json.loads((folder / "found.json").read_text())
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    found: list[tuple[str, int] | None] = []
    for n, annotated in enumerate(tqdm(images, desc=f"rasterising {label}", leave=False, disable=None)):
        if annotated.image is None or not (annotated.regions or annotated.background):
            found.append(None)
            continue
        declared, size = (annotated.width, annotated.height), image_size(annotated.image)
        if declared != size:  # checked before painting: a declared 30000 x 30000 would be painted, then refused
            raise DatasetError(f"{label}, image {annotated.name}: the export declares {declared[0]}x{declared[1]} "
                               f"pixels, but {annotated.image} is {size[0]}x{size[1]}; export the annotations of "
                               "these very files again")
        with malformed(f"{label}, image {annotated.name}"):
            mask, overlap = paint(annotated, ignore, overlap_ignored)
        Image.fromarray(mask).save(partial / f"{n:06d}.png", compress_level=1)
        found.append((f"{n:06d}.png", overlap))
    (partial / "found.json").write_text(json.dumps(found))
    try:
        partial.rename(folder)
    except OSError:  # another process of the same run rasterised it first
        shutil.rmtree(partial, ignore_errors=True)
    return folder, found


BACKGROUND_NAMES = ("background", "_background_", "__background__")  # the tools' names for "no object here"


def shape_table(names: list[str], source: str, colours: dict[str, tuple[int, int, int]] | None = None
                ) -> tuple[ClassTable, dict[str, int], int]:
    """The class table of a shape export: background (class 0, the pixels no shape covers; named as the export
    names it, if it does), then `names` in the export's order; the mask value of each name (background's 0), and
    the value of ignored pixels."""
    background = next((n for n in names if n.lower() in BACKGROUND_NAMES), "background")
    names = [n for n in dict.fromkeys(names) if n != background]
    ignore = IGNORE_INDEX if len(names) < IGNORE_INDEX else 65535
    colours = colours or {}
    rows = [ClassRow(background, 0, colours.get(background))]
    rows += [ClassRow(name, i, colours.get(name)) for i, name in enumerate(names, 1)]
    value_of = {background: 0} | {n: i for i, n in enumerate(names, 1)}
    return ClassTable((*rows, ClassRow("ignore", ignore)), source), value_of, ignore


def read_shapes(root: Path, layout: str, splits: dict[str, ShapeSplit], table: ClassTable, ignore: int,
                parts: list[bytes], overlap_ignored: bool = False) -> DatasetTree:
    """A tree of a shape export's splits, rasterised once: images that are not there, have no region, or are
    boxes only are counted per split; overlaps (COCO) are counted over the images that are there."""
    digest = digest_of([*parts, "\n".join(table.names).encode(), str(overlap_ignored).encode()])
    order = [a for split in splits.values() for a in split.images]
    folder, found = rasterise(f"{root} ({layout})", digest, order, ignore, overlap_ignored)
    tree, at = DatasetTree(root, layout, {}, table, "index"), 0
    for name, split in splits.items():
        files, missing, empty, overlap = SplitFiles(), [], [], [0, 0]
        for annotated in split.images:
            result, at = found[at], at + 1
            if annotated.image is None:
                missing += [annotated.name] if annotated.regions else []
            elif result is None:
                empty.append(annotated.name)
            else:
                files.pairs.append((annotated.image, folder / result[0]))
                overlap = [overlap[0] + result[1], overlap[1] + (result[1] > 0)]
        tree.splits[name] = files
        tree.findings += [f"split {name}: {finding}" for finding in split.findings]
        if missing:
            tree.findings.append(f"split {name}: {len(missing)} annotated images are not there, their annotations "
                                 f"unused: {some(missing)}")
        if empty:
            tree.findings.append(f"split {name}: {len(empty)} images have no annotation: skipped, not read as all "
                                 f"background: {some(empty)}")
        if overlap[0]:
            tree.findings.append(f"split {name}: annotations of different categories overlap on {overlap[0]:,} "
                                 f"pixels in {overlap[1]} images; those pixels are ignored")
    if not any(f.pairs for f in tree.splits.values()) and not any(a.regions for a in order):
        raise DatasetError(f"{root} (layout {layout}) holds no polygon or mask: "
                           + "; ".join(tree.findings or ["no image has a shape"]))
    return tree


def export_digest(root: Path, layout: str, sources: list[Path]) -> str:
    """A digest of what a shape export's reader reads: its annotation files' bytes, and the image files under ROOT
    (names and sizes), so that an edited, added or removed file reads the export anew."""
    parts = [layout.encode()]
    for path in sources:
        try:
            parts.append(path.name.encode() + b"\0" + path.read_bytes())
        except OSError as e:
            raise DatasetError(f"cannot read {path}: {e}") from None
    images = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*"))
              if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return digest_of([*parts, json.dumps(images).encode()])


def save_tree(tree: DatasetTree, path: Path) -> None:
    """A read shape export, as plain JSON: image paths relative to its root where they are under it, masks
    relative to the mask cache."""
    masks = cache_root() / "deeplab_masks"
    where = lambda p: p.relative_to(tree.root).as_posix() if p.is_relative_to(tree.root) else str(p)  # noqa: E731
    data = {"splits": {s: [[where(i), m.relative_to(masks).as_posix()] for i, m in f.pairs] for s, f in
                       tree.splits.items()},
            "table": [tree.table.source, [[r.name, r.id, r.colour] for r in tree.table.rows]],
            "findings": tree.findings, "notes": tree.notes}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def load_tree(path: Path, root: Path, layout: str) -> DatasetTree:
    data, masks = json.loads(path.read_text()), cache_root() / "deeplab_masks"
    rows = tuple(ClassRow(name, i, tuple(colour) if colour else None) for name, i, colour in data["table"][1])
    splits = {s: SplitFiles([(root / i, masks / m) for i, m in pairs]) for s, pairs in data["splits"].items()}
    return DatasetTree(root, layout, splits, ClassTable(rows, data["table"][0]), "index", data["findings"],
                       data["notes"])


def cached_tree(layout: str, read: Callable[[Path], DatasetTree],
                sources: Callable[[Path], list[Path]]) -> Callable[[Path], DatasetTree]:
    """A shape export's reader whose result is kept by export_digest: a second open reads no annotation (the
    masks themselves are kept by rasterise)."""

    def reader(root: Path) -> DatasetTree:
        path = cache_root() / "deeplab_masks" / "trees" / f"{export_digest(root, layout, sources(root))}.json"
        if path.is_file():
            return load_tree(path, root, layout)
        tree = read(root)
        save_tree(tree, path)
        return tree

    return reader


def boxes_only(where: str, boxes: int) -> DatasetError:
    return DatasetError(f"{where}: its {boxes} annotations are boxes only (or lines and points), no polygon or mask; "
                        "a segmentation model needs polygons or masks: draw those (or brush masks) and export again")


# ---- masks to shapes: a model's masks written back as each tool imports its own annotations -------------------------


def connected_regions(bits: np.ndarray) -> tuple[np.ndarray, int]:
    """The 8-connected regions of a boolean mask [h, w]: their labels (0 outside, 1..n) and n. The runs of each
    row are joined to the runs of the row above that they touch, by union-find over runs."""
    h, w = bits.shape
    edges = np.diff(np.pad(bits, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; row-major like the starts, so run i is [starts[i], ends[i])
    parent = np.arange(len(starts))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    first = np.searchsorted(rows, np.arange(h + 1))
    for r in range(1, h):
        i, j = first[r - 1], first[r]
        while i < first[r] and j < first[r + 1]:
            if starts[j] <= ends[i] and starts[i] <= ends[j]:  # overlapping or touching at a corner
                parent[root(j)] = root(i)
            i, j = (i + 1, j) if ends[i] < ends[j] else (i, j + 1)
    roots = np.array([root(i) for i in range(len(starts))], np.int64)
    unique, run_label = np.unique(roots, return_inverse=True)
    labels, lengths = np.zeros(h * w, np.int32), ends - starts
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    labels[np.repeat(rows * w + starts, lengths) + offsets] = np.repeat(run_label + 1, lengths)
    return labels.reshape(h, w), len(unique)


def mask_box(bits: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), the first and last column and row of a mask's pixels (inclusive)."""
    ys, xs = np.nonzero(bits.any(1))[0], np.nonzero(bits.any(0))[0]
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def png_base64(bits: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(bits.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def link_or_copy(source: Path, target: Path) -> None:
    """The image file as it is (its EXIF turn kept, as the tools apply it), hard-linked where the disk allows."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def distinct_colours(names: list[str], palette: np.ndarray, background: int | None) -> list[tuple[int, int, int]]:
    """A colour per class: its palette colour, background's black, and for a class whose colour is black or
    another's, the first VOC colour that no class has (the tools tell classes apart by colour)."""
    wanted = [(0, 0, 0) if c == background else tuple(int(v) for v in palette[c]) for c in range(len(names))]
    spare = iter(tuple(int(v) for v in rgb) for rgb in voc_colormap(256)[1:] if tuple(rgb) not in wanted)
    colours, seen = [], {(0, 0, 0)}
    for c, colour in enumerate(wanted):
        colour = colour if c == background or colour not in seen else next(spare)
        seen.add(colour)
        colours.append(colour)
    return colours


def region_rles(labels: np.ndarray, n: int) -> list[list[int]]:
    """The uncompressed COCO RLE counts of each region 1..n of a label image (column-major runs, a run of 0s
    first), all from one pass over the image, not one mask per region."""
    flat = labels.ravel(order="F")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1])
    ends = np.append(starts[1:], flat.size)
    order = np.argsort(flat[starts], kind="stable")  # by region, each region's runs in the order they come
    starts, ends, region = starts[order], ends[order], flat[starts][order]
    first = np.searchsorted(region, np.arange(1, n + 2))
    before = np.concatenate([[0], ends[:-1]])
    before[first[:-1]] = 0  # the 0s before a region's first run start at the top-left
    pairs = np.stack([starts - before, ends - starts], 1)
    tails = [int(flat.size - ends[first[k + 1] - 1]) for k in range(n)]  # the 0s after its last run, if any
    return [pairs[first[k]:first[k + 1]].ravel().tolist() + ([tails[k]] if tails[k] else []) for k in range(n)]


PRE_LABEL_MARKER = ".pre-labels"  # in each folder of pre-labels: a later --predict may replace it


class PreLabelWriter:
    """One tool's import of a model's predictions, in DIR/<folder>/: add() each image (its name, a path relative
    to the pool with "/" and no suffix; its file; its mask of class indices at the size it is displayed; the max
    softmax per pixel; the image's score, the estimated share of its pixels wrong), then close(). A class named
    as background is the tools' background (no shape); every other class is one."""

    folder, zipped = "", False

    def __init__(self, out: Path, names: list[str], palette: np.ndarray, model_version: str = "",
                 image_url: str = ""):
        self.out, self.names, self.model_version, self.image_url = out / self.folder, names, model_version, image_url
        self.background = next((c for c, n in enumerate(names) if n.lower() in BACKGROUND_NAMES), None)
        self.colours = distinct_colours(names, palette, self.background)
        self.items: list[str] = []
        if self.out.exists() and not (self.out / PRE_LABEL_MARKER).is_file():
            raise DatasetError(f"--out: {self.out} exists and holds no pre-labels of an earlier --predict; choose "
                               "another --out")
        shutil.rmtree(self.out, ignore_errors=True)  # the pre-labels of an earlier --predict into this --out
        self.out.mkdir(parents=True)
        (self.out / PRE_LABEL_MARKER).write_text("pre-labels written by evaluate.py --predict\n")

    def objects(self) -> list[int]:
        """The classes written as shapes: all but background."""
        return [c for c in range(len(self.names)) if c != self.background]

    def add(self, name: str, image: Path, mask: np.ndarray, confidence: np.ndarray, score: float) -> None:
        raise NotImplementedError

    def close(self) -> Path:
        """Write what covers every image and zip the folder, where the tool uploads zips; the file to import."""
        if not self.zipped:
            return self.out
        target = self.out.with_suffix(".zip")
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(p for p in self.out.rglob("*") if p.is_file() and p.name != PRE_LABEL_MARKER):
                archive.write(path, path.relative_to(self.out).as_posix())
        return target


# ---- voc: the devkit's tree, and the trees built on it (CVAT's masks, labelme2voc) ----------------------------------

# VOC2012's devkit: JPEGImages/, SegmentationClass/ (palette PNGs, 255 the cream void border), and
# ImageSets/Segmentation/<split>.txt, one frame name a line; trainval.txt is train + val. SBD adds
# SegmentationClassAug/ with train_aug.txt, as DeepLab repositories use it.
VOC_ROOTS = (".", "VOCdevkit/VOC2012", "VOCdevkit/VOC2007", "VOC2012", "VOC2007")
VOC_IMAGES = "JPEGImages"
VOC_MASKS = ("SegmentationClass", "SegmentationClassPNG")  # older labelme2voc.py wrote its PNGs to ...PNG
VOC_LISTS = "ImageSets/Segmentation"
VOC_UNION = "trainval"  # train and val together, where it is their union
SBD_MASKS, SBD_SPLIT = "SegmentationClassAug", "train_aug"
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_colormap(n: int) -> np.ndarray:
    """The VOC colour of each index 0..n-1 (the devkit's bit-interleaving; LabelMe and CVAT paint with it too)."""
    colours = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r, g, b = r | ((c & 1) << shift), g | (((c >> 1) & 1) << shift), b | (((c >> 2) & 1) << shift)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def voc_table() -> ClassTable:
    """VOC's 21 classes by index and colour; 255 (its cream border colour) is void."""
    colours = voc_colormap(256)
    rows = tuple(ClassRow(name, i, tuple(colours[i].tolist())) for i, name in enumerate(VOC_CLASSES))
    void = ClassRow("ignore", IGNORE_INDEX, tuple(colours[IGNORE_INDEX].tolist()))  # the cream border
    return ClassTable((*rows, void), "the VOC table")


def voc_base(root: Path) -> Path | None:
    """Where a VOC-like tree (a mask folder beside JPEGImages) is: ROOT itself, or VOCdevkit/VOC2012 or
    VOC2007 under it."""
    for sub in VOC_ROOTS:
        base = root / sub
        if (base / VOC_IMAGES).is_dir() and any((base / d).is_dir() for d in (*VOC_MASKS, SBD_MASKS)):
            return base
    return None


def painted_like_voc(path: Path) -> bool | None:
    """Whether a mask is the devkit's: a palette PNG whose every value used is a VOC class or void and has VOC's
    colour there, or RGB of VOC's colours only. None for a file Pillow cannot read (named by the checks)."""
    devkit = voc_colormap(256)
    colours = {tuple(devkit[v].tolist()) for v in (*range(len(VOC_CLASSES)), IGNORE_INDEX)}
    try:
        with open_image(path, what="mask") as im:
            if im.mode == "P":
                palette = np.array(im.getpalette() or [], np.uint8).reshape(-1, 3)
                used = np.flatnonzero(im.histogram()[:256])
                return all(v < len(palette) and (v < len(VOC_CLASSES) or v == IGNORE_INDEX)
                           and (palette[v] == devkit[v]).all() for v in used)
            if im.mode in ("RGB", "RGBA"):
                found = im.convert("RGB").getcolors(im.width * im.height) or []
                return all(tuple(c) in colours for _, c in found)
            return False
    except (OSError, ValueError):
        return None


def is_rgb(path: Path) -> bool:
    try:
        with open_image(path, what="mask") as im:
            return im.mode in ("RGB", "RGBA")
    except (OSError, ValueError):
        return False


def mask_id_values(paths: list[Path]) -> list[int]:
    """The distinct values of single-channel masks (8 or 16 bits), those Pillow reads."""
    values: set[int] = set()
    for path in paths:
        try:
            with open_image(path, what="mask") as im:
                values.update(np.unique(np.asarray(im)).tolist() if im.mode not in ("RGB", "RGBA") else [])
        except (OSError, ValueError):
            continue
    return sorted(int(v) for v in values)


def sample_masks(pairs: list[tuple[Path, Path]], n: int = 16) -> list[Path]:
    """n masks spread evenly over a split."""
    picks = np.linspace(0, len(pairs) - 1, min(n, len(pairs))).round().astype(int) if pairs else []
    return [pairs[i][1] for i in sorted(set(np.asarray(picks).tolist()))]


def numbered_voc_table(base: Path, masks: list[Path], why: str) -> tuple[ClassTable | None, str]:
    """A tree with no class file whose masks are not VOC's: the ids its masks hold as numbered classes (every id
    up to the largest, for 8-bit masks), and the line that says so and `why`; None where the masks are colours."""
    values = [v for v in mask_id_values(masks) if v != IGNORE_INDEX]
    if not values:
        return None, ""
    ids = list(range(max(values) + 1)) if max(values) < IGNORE_INDEX else values
    rows = tuple(ClassRow(f"class_{v}", v) for v in ids) + (ClassRow("ignore", IGNORE_INDEX),)
    note = (f"{base}: {why}: their ids {ids[0]}..{ids[-1]} are read as {len(ids)} numbered classes "
            f"class_{ids[0]}..class_{ids[-1]}; name them with --classes FILE (`python dataset.py --data {base} "
            "--check --write-classes classes.csv` writes one to edit)")
    return ClassTable(rows, f"{len(ids)} numbered classes"), note


def voc_split(base: Path, list_file: Path, images: dict, masks: dict, layout: str) -> tuple[SplitFiles, list[str]]:
    """The files a list names, and findings; CVAT writes no mask for a frame without shapes: those are skipped."""
    files, no_image, no_mask, split = SplitFiles(), [], [], list_file.stem
    mask_dir = base / (SBD_MASKS if split == SBD_SPLIT else VOC_MASKS[0])
    for _, line in text_lines(list_file):
        name = line if line in images or line in masks else line.split()[0]  # VOC's Main lists add a flag
        image, mask = images.get(name), masks.get(name)
        if image is None:
            no_image.append(name)
            files.masks_without_image += [mask] if mask is not None else []
        elif mask is None and layout == "cvat":
            no_mask.append(name)
        elif mask is None:
            files.images_without_mask.append((image, mask_dir / f"{name}.png"))
        else:
            files.pairs.append((image, mask))
    findings = [f"{list_file} names {len(no_image)} frames with no image in {base / VOC_IMAGES}: "
                + ", ".join(no_image[:5])] if no_image else []
    if no_mask:
        findings.append(f"split {split}: {len(no_mask)} frames have no mask (CVAT writes none for a frame without "
                        "shapes): skipped, not read as background")
    return files, findings


def mark_union(tree: DatasetTree, lists: dict[str, list[str]]) -> None:
    """trainval is the union of train and val only where it lists exactly their frames; otherwise it is a split
    of its own, as written, and a note says so."""
    if VOC_UNION not in lists or not {"train", "val"} <= lists.keys():
        return
    union = set(lists["train"]) | set(lists["val"])
    if set(lists[VOC_UNION]) == union:
        tree.unions.add(VOC_UNION)
        return
    outside = len(set(lists[VOC_UNION]) - union)
    tree.notes.append(f"{VOC_UNION}.txt is not train + val ({len(lists[VOC_UNION])} frames, {outside} in neither): "
                      "read as a split of its own")


def voc_like_table(base: Path, layout: str, pairs: list[tuple[Path, Path]]) -> tuple[ClassTable | None, list[str]]:
    """The class file beside the tree (CVAT's labelmap.txt, labelme's class_names.txt); else VOC's 21 classes
    where the masks are painted as the devkit paints them, or hold only VOC's ids in the devkit's own tree
    (VOC2012/, VOC2007/, or with SBD's grey SegmentationClassAug/); else numbered classes, and a note says so."""
    if (base / CVAT_LABELMAP).is_file():
        return read_labelmap(base / CVAT_LABELMAP), []
    if (base / LABELME_CLASSES).is_file():
        return read_class_names(base / LABELME_CLASSES), []
    if layout == "cvat":
        raise DatasetError(f"--layout cvat: {base} has no {CVAT_LABELMAP}")
    sample = sample_masks(pairs)
    devkit = base.name in ("VOC2012", "VOC2007") or (base / SBD_MASKS).is_dir()  # its masks may be grey (SBD's)
    if layout == "labelme" and not devkit:  # labelme2voc.py paints the user's own labels in VOC's palette
        table, note = numbered_voc_table(base, sample, f"labelme2voc.py's tree without its {LABELME_CLASSES}: "
                                         "its masks hold the ids of labels it does not name, not VOC's")
        return table, [note] if note else []
    voc_ids = set(range(len(VOC_CLASSES))) | {IGNORE_INDEX}
    if all(painted_like_voc(mask) is not False for mask in sample) or (
            devkit and set(mask_id_values(sample)) <= voc_ids and not any(is_rgb(m) for m in sample)):
        return voc_table(), []
    table, note = numbered_voc_table(base, sample, "no class file, and the masks are not VOC's (its palette and "
                                     "classes 0..20)")
    return table, [note] if note else []


def read_voc_like(root: Path, layout: str) -> DatasetTree:
    """A VOC, CVAT or LabelMe tree: the splits its lists name (without lists: every image with a mask, as
    split train), and its class table (voc_like_table)."""
    base = voc_base(root)
    if base is None:
        raise DatasetError(f"--layout {layout}: {root} holds no {VOC_IMAGES}/ beside {VOC_MASKS[0]}/")
    images = images_by_stem(base / VOC_IMAGES, recursive=True)
    mask_dir = next((base / d for d in VOC_MASKS if images_by_stem(base / d)), base / VOC_MASKS[0])
    masks = images_by_stem(mask_dir, recursive=True)
    lists = sorted((base / VOC_LISTS).glob("*.txt"))
    tree = DatasetTree(root, layout, {}, encoding="colour" if layout == "cvat" else "auto")
    for list_file in lists:
        split_masks = images_by_stem(base / SBD_MASKS, True) if list_file.stem == SBD_SPLIT else masks
        tree.splits[list_file.stem], findings = voc_split(base, list_file, images, split_masks, layout)
        tree.findings += findings
    mark_union(tree, {f.stem: [line for _, line in text_lines(f)] for f in lists})
    if not lists:
        tree.splits["train"] = pair_by_stem(images, masks, mask_dir)
    listed = {m for files in tree.splits.values() for m in (*(p[1] for p in files.pairs), *files.masks_without_image)}
    unlisted = sorted(m.name for m in masks.values() if m not in listed)
    if lists and unlisted:
        tree.findings.append(f"{len(unlisted)} masks of {mask_dir} are in no list of {base / VOC_LISTS}: "
                             + ", ".join(unlisted[:5]))
    tree.table, notes = voc_like_table(base, layout, [p for f in tree.splits.values() for p in f.pairs])
    tree.notes += notes
    return tree


# ---- cvat mask: "Segmentation mask 1.1", a VOC tree with labelmap.txt and RGB masks in its colours ----------------

CVAT_LABELMAP = "labelmap.txt"  # "# label:color_rgb:parts:actions", then name:r,g,b:: per label
CVAT_OBJECTS, CVAT_SUBSET = "SegmentationObject", "default"  # its instance masks; the one subset it exports


def read_labelmap(path: Path) -> ClassTable:
    """CVAT's labelmap.txt: `name:r,g,b:parts:actions` per label, in index order (the name may hold colons)."""
    rows, seen = [], {}
    for n, line in text_lines(path):
        name, colour = (line.rsplit(":", 3) + ["", ""])[:2] if line.count(":") >= 3 else (line, "")
        rgb = tuple(int(v) for v in colour.split(",") if v.strip().isdigit())
        if len(rgb) != 3 or len(colour.split(",")) != 3 or max(rgb) > 255:
            raise DatasetError(f"{path}, line {n}: expected name:r,g,b::, got {line!r}")
        if rgb in seen:
            raise DatasetError(f"{path}, line {n}: colour {rgb} is already the colour of line {seen[rgb]}")
        seen[rgb] = n
        rows.append(ClassRow(name.strip(), None, rgb))
    if not rows:
        raise DatasetError(f"{path} lists no label")
    return ClassTable(tuple(rows), f"{path.name} with {len(rows)} labels")


def read_cvat_masks(root: Path) -> DatasetTree:
    return read_voc_like(root, "cvat")


class CvatMaskWriter(PreLabelWriter):
    """CVAT's "Segmentation mask 1.1", as its exporter writes it, for "Upload annotations" into a task of these
    images or "Import dataset" into a project: labelmap.txt (background:0,0,0:: first), SegmentationClass/NAME.png
    in the labels' colours, SegmentationObject/NAME.png (an instance per class present, in VOC's palette: CVAT
    pairs each with the class under it), ImageSets/Segmentation/default.txt and the images in JPEGImages/."""

    folder, zipped = "cvat", True

    def add(self, name: str, image: Path, mask: np.ndarray, confidence: np.ndarray, score: float) -> None:
        classes, objects = self.out / VOC_MASKS[0] / f"{name}.png", self.out / CVAT_OBJECTS / f"{name}.png"
        classes.parent.mkdir(parents=True, exist_ok=True)
        objects.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.array(self.colours, np.uint8)[mask]).save(classes)
        instances = np.zeros(mask.shape, np.uint8)
        for i, c in enumerate((c for c in np.unique(mask) if c != self.background), 1):
            instances[mask == c] = i
        paletted = Image.fromarray(instances, "P")
        paletted.putpalette(voc_colormap(256).ravel().tolist())
        paletted.save(objects)
        link_or_copy(image, self.out / VOC_IMAGES / f"{name}{image.suffix.lower()}")
        self.items.append(name)

    def close(self) -> Path:
        rows = [("background", (0, 0, 0))] + [(self.names[c], self.colours[c]) for c in self.objects()]
        lines = ["# label:color_rgb:parts:actions"] + [f"{n}:{r},{g},{b}::" for n, (r, g, b) in rows]
        (self.out / CVAT_LABELMAP).write_text("\n".join(lines) + "\n")
        (self.out / VOC_LISTS).mkdir(parents=True, exist_ok=True)
        (self.out / VOC_LISTS / f"{CVAT_SUBSET}.txt").write_text("".join(f"{n}\n" for n in self.items))
        return super().close()


# ---- cvat xml: "CVAT for images 1.1", annotations.xml ---------------------------------------------------------------

# <annotations><meta><task|project|job>...<labels><label><name>car</name><color>#fa3253</color>... then per image
# <image id name subset width height> holding <polygon label points="x,y;x,y" z_order>, <mask label rle="n, n, ..."
# left top width height z_order> (runs over the box, row-major, the first of zeros), <ellipse cx cy rx ry rotation>,
# <box xtl ytl xbr ybr> and <polyline>/<points> (no area). CVAT's own mask export paints by z_order, later on top.
CVAT_XML = "annotations.xml"
CVAT_AREAS = ("polygon", "mask", "ellipse")
CVAT_NO_AREA = ("box", "polyline", "points", "skeleton", "cuboid", "tag")
CVAT_NO_AREA_LABELS = ("rectangle", "polyline", "points", "skeleton", "cuboid", "tag")  # a label's <type>


def cvat_labels(meta: ET.Element | None) -> tuple[list[str], dict[str, tuple[int, int, int]]]:
    """The labels that can have an area, in order, and their colours: a skeleton's points (labels with a
    <parent>) and labels of a type with no area are no classes."""
    names, colours = [], {}
    for label in meta.iter("label") if meta is not None else []:
        name, colour = label.findtext("name"), (label.findtext("color") or "").lstrip("#")
        if label.find("parent") is not None or (label.findtext("type") or "any") in CVAT_NO_AREA_LABELS:
            continue
        if name and name not in names:
            names.append(name)
            if len(colour) == 6:
                colours[name] = tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))
    return names, colours


def cvat_rle(shape: ET.Element, where: str) -> Region:
    """CVAT's <mask>: runs of 0s and 1s (the first of 0s) over its box, row by row."""
    try:
        runs = [int(v) for v in shape.get("rle", "").split(",")]
        left, top, width, height = (int(float(shape.get(k))) for k in ("left", "top", "width", "height"))
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: a <mask> without a whole-number rle, left, top, width and height") from None
    if min(width, height) < 0:
        raise DatasetError(f"{where}: a <mask> of width {width} and height {height}")
    if over_pixel_limit(width * height):
        raise too_many_pixels("a <mask> in", where, width * height)
    if sum(runs) != width * height or min(runs, default=0) < 0:
        raise DatasetError(f"{where}: a <mask> whose runs add up to {sum(runs)}, not its {width}x{height} box")
    bits = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool).reshape(height, width)
    return Region(0, bitmap=bits, left=left, top=top)


def cvat_region(shape: ET.Element, where: str) -> Region:
    if shape.tag == "mask":
        return cvat_rle(shape, where)
    if shape.tag == "ellipse":
        cx, cy, rx, ry = (float(shape.get(k, 0)) for k in ("cx", "cy", "rx", "ry"))
        return Region(0, polygons=[ellipse(cx, cy, rx, ry, math.radians(float(shape.get("rotation", 0))))])
    points = [float(v) for pair in shape.get("points", "").split(";") for v in pair.split(",") if v.strip()]
    return Region(0, polygons=[points] if len(points) >= 6 else None)


def read_cvat_xml(root: Path) -> DatasetTree:
    """CVAT for images 1.1: classes in <labels> order after background, each image's shapes painted by z_order;
    boxes, lines and points (no area) skipped and counted; images of the task without shapes skipped."""
    path = root / CVAT_XML
    try:
        raw = path.read_bytes()
        document = ET.fromstring(raw)
    except (OSError, ET.ParseError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    names, colours = cvat_labels(document.find("meta"))
    names = names or list(dict.fromkeys(s.get("label", "") for s in document.iter() if s.tag in CVAT_AREAS))
    table, value_of, ignore = shape_table(names, f"{CVAT_XML} with {len(names)} labels", colours)
    splits: dict[str, ShapeSplit] = {}
    skipped: Counter[str] = Counter()
    below = images_below(root)  # CVAT's images/<subset>/, or a folder of the user's such as images/raw/
    for image in document.iter("image"):
        subset = image.get("subset") or "default"
        split, where = splits.setdefault(subset, ShapeSplit()), f"{path}, image {image.get('name')!r}"
        with malformed(where):
            split.images.append(cvat_image(root, image, subset, value_of, skipped, where, below))
    if not any(a.regions for s in splits.values() for a in s.images) and skipped:
        raise boxes_only(str(path), sum(skipped.values()))
    tree = read_shapes(root, "cvat-xml", splits, table, ignore, [raw])
    tree.findings += [f"{n} shapes {what}: skipped" for what, n in skipped.items()]
    return tree


def cvat_image(root: Path, image: ET.Element, subset: str, value_of: dict[str, int], skipped: Counter,
               where: str, below: dict[str, list[Path]]) -> Annotated:
    """One <image>: its areas painted by z_order (file order within one), and what has no area counted."""
    shapes = sorted((s for s in image if s.tag in CVAT_AREAS), key=lambda s: int(s.get("z_order", 0) or 0))
    regions = []
    for shape in shapes:
        region = cvat_region(shape, where)
        if shape.get("label") not in value_of:
            skipped[f"of a label <labels> does not list ({shape.get('label')})"] += 1
        elif region.polygons is not None or region.bitmap is not None:
            region.value = value_of[shape.get("label")]
            regions.append(region)
    skipped.update(f"<{s.tag}> (no area)" for s in image if s.tag in CVAT_NO_AREA)
    name = image.get("name", "")
    found = find_image(name, [root / "images" / subset, root / "images", root], below)
    return Annotated(name, found, int(image.get("height", 0)), int(image.get("width", 0)), regions)


# ---- labelme: its own JSON beside each image, and labelme2voc.py's tree ---------------------------------------------

# One JSON per image: {"version", "flags", "shapes": [{"label", "points", "group_id", "shape_type", "flags",
# "mask"}], "imagePath" (relative to the JSON), "imageData" (base64 of the image file, or null), "imageHeight",
# "imageWidth"}. labelme2voc.py paints shapes in file order, later on top; its labels.txt (or the class_names.txt it
# writes) is __ignore__ (255), _background_ (0), then a class a line.
LABELME_CLASSES = "class_names.txt"
LABELME_LABELS = ("labels.txt", LABELME_CLASSES)
LABELME_IGNORE = "__ignore__"  # labelme2voc.py paints such shapes 255
LABELME_BACKGROUND, LABELME_VERSION = "_background_", "5.5.0"  # labelme2voc's class 0; the format written


def read_class_names(path: Path) -> ClassTable:
    """labelme2voc.py's class_names.txt: class i is line i (mask index i), drawn in the VOC colour of i."""
    names = [line for _, line in text_lines(path)]
    if not names or len(set(names)) != len(names):
        raise DatasetError(f"{path} {'repeats a name' if names else 'lists no class'}")
    colours = voc_colormap(len(names))
    rows = tuple(ClassRow(name, i, tuple(colours[i].tolist())) for i, name in enumerate(names))
    return ClassTable(rows + (ClassRow("ignore", IGNORE_INDEX),), f"{path.name} with {len(rows)} classes")


def read_labelme_tree(root: Path) -> DatasetTree:
    """labelme2voc.py's output: one tree at ROOT (split train), or one per split under it (train/, val/)."""
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_NAMES and voc_base(d)]
    trees = {d.name: d for d in folders if (d / LABELME_CLASSES).is_file()}
    if voc_base(root) is not None or not trees:
        return read_voc_like(root, "labelme")
    merged = DatasetTree(root, "labelme", {})
    for split, folder in trees.items():
        tree = read_voc_like(folder, "labelme")
        if merged.table is not None and tree.table.names != merged.table.names:
            raise DatasetError(f"{folder / LABELME_CLASSES} names other classes than {merged.table.source} of "
                               f"{next(iter(trees.values()))}; one class table serves every split")
        merged.table, merged.splits[split] = tree.table, tree.splits["train"]
        merged.findings += tree.findings
    return merged


def is_labelme_json(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096)
    return b'"shapes"' in head or (b'"imagePath"' in head and b'"version"' in head)


def labelme_jsons(root: Path) -> dict[str, list[Path]]:
    """split -> LabelMe files: those in ROOT are split train; else each folder of them is a split."""
    own = [p for p in sorted(root.glob("*.json")) if is_labelme_json(p)]
    if own:
        return {"train": own}
    found = {d.name: [p for p in sorted(d.glob("*.json")) if is_labelme_json(p)]
             for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_NAMES}
    return {split: files for split, files in found.items() if files}


def labelme_region(shape: dict, where: str) -> Region | None:
    """A shape as labelme2voc.py paints it (shape_to_mask, in Pillow); None for a shape it cannot draw."""
    kind, points = shape.get("shape_type") or "polygon", shape.get("points") or []
    try:
        xy = [(float(x), float(y)) for x, y in points]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: a {kind} whose points are not [x, y] pairs") from None
    if kind == "mask" and len(xy) == 2:
        try:
            png = base64.b64decode(shape.get("mask") or "")
            bits = np.asarray(open_image(where, png, "the shape mask in")).astype(bool)
        except (ValueError, OSError):
            raise DatasetError(f"{where}: a mask that is no base64 PNG") from None
        bits = bits if bits.ndim == 2 else bits.any(-1)
        return Region(0, bitmap=bits, left=round(xy[0][0]), top=round(xy[0][1]))
    corners = [(min(x for x, _ in xy), min(y for _, y in xy)), (max(x for x, _ in xy), max(y for _, y in xy))]
    if kind == "rectangle" and len(xy) == 2:
        return Region(0, drawing=("rectangle", corners))
    if kind == "circle" and len(xy) == 2:
        (cx, cy), r = xy[0], math.dist(*xy)
        return Region(0, drawing=("ellipse", [(cx - r, cy - r), (cx + r, cy + r)]))
    if kind == "point" and len(xy) == 1:
        (cx, cy), r = xy[0], LABELME_POINT_RADIUS
        return Region(0, drawing=("ellipse", [(cx - r, cy - r), (cx + r, cy + r)]))
    if (kind == "line" and len(xy) == 2) or (kind == "linestrip" and len(xy) >= 2):
        return Region(0, drawing=(kind, xy))
    if (kind == "polygon" and len(xy) >= 3) or (kind == "oriented_rectangle" and len(xy) == 4):
        return Region(0, drawing=("polygon", xy))
    return None


def embedded_image(data: str, where: str) -> Path:
    """A LabelMe file's imageData (base64 of the image file), written once into the cache by its digest."""
    try:
        raw = base64.b64decode(data)
        with open_image(where, raw, "the imageData of") as im:
            suffix = f".{(im.format or 'png').lower()}"
    except (ValueError, OSError):
        raise DatasetError(f"{where}: imageData is not a base64 image") from None
    path = cache_root() / "deeplab_masks" / "embedded" / f"{hashlib.sha1(raw).hexdigest()[:16]}{suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(raw)
        partial.replace(path)
    return path


def labelme_label_files(root: Path) -> list[Path]:
    """labels.txt or class_names.txt beside LabelMe's files, or one folder up, where labelme's examples keep it."""
    return [folder / name for folder in (root, root.parent) for name in LABELME_LABELS if (folder / name).is_file()]


def labelme_table(root: Path, labels: list[str]) -> tuple[ClassTable, dict[str, int], int, str]:
    """The classes of LabelMe files: labels.txt or class_names.txt beside them (or one folder up, where
    labelme's examples keep it) in its order, else the labels in the order the files first use them; shapes
    labelled __ignore__ are ignored."""
    for path in labelme_label_files(root)[:1]:
        names = [line for _, line in text_lines(path) if line != LABELME_IGNORE]
        table, value_of, ignore = shape_table(names, f"{path.name} with {len(names)} classes")
        return table, value_of | {LABELME_IGNORE: ignore}, ignore, str(path)
    names = [n for n in labels if n != LABELME_IGNORE]
    table, value_of, ignore = shape_table(names, f"{len(set(names))} labels of the files")
    return table, value_of | {LABELME_IGNORE: ignore}, ignore, ""


def read_labelme_json(root: Path) -> DatasetTree:
    """LabelMe's own files: each JSON's shapes painted in file order over background, the image at imagePath
    (relative to the JSON; else beside it by stem; else its imageData)."""
    files = labelme_jsons(root)
    documents, parts = {}, []
    for path in (p for split in files.values() for p in split):
        documents[path], raw = read_json(path)
        parts.append(raw)
    labels = [str(s.get("label", "")) for d in documents.values() if isinstance(d, dict)
              for s in (d.get("shapes") if isinstance(d.get("shapes"), list) else []) if isinstance(s, dict)]
    table, value_of, ignore, source = labelme_table(root, labels)
    splits, skipped = {}, Counter()
    for split, paths in files.items():
        splits[split] = ShapeSplit()
        for path in paths:
            with malformed(str(path)):
                splits[split].images.append(labelme_image(path, documents[path], value_of, skipped))
    if not any(a.regions for s in splits.values() for a in s.images) and skipped:
        raise boxes_only(f"the LabelMe files of {root}", sum(skipped.values()))
    tree = read_shapes(root, "labelme-json", splits, table, ignore, parts)
    tree.notes += [f"classes from {source}"] if source else []
    tree.findings += [f"{n} shapes {what}: skipped" for what, n in skipped.items()]
    return tree


def labelme_image(path: Path, document: object, value_of: dict[str, int], skipped: Counter) -> Annotated:
    if not isinstance(document, dict) or not isinstance(document.get("shapes", []), list):
        raise DatasetError(f"{path} is not a LabelMe file: a JSON object with a list `shapes`")
    regions = []
    for shape in document["shapes"]:
        label = str(shape.get("label", "")) if isinstance(shape, dict) else ""
        region = labelme_region(shape, f"{path}, shape {label!r}") if isinstance(shape, dict) else None
        if region is None:
            skipped[f"of type {shape.get('shape_type') if isinstance(shape, dict) else '?'} LabelMe cannot draw"] += 1
        elif label not in value_of:
            skipped[f"of a label the class file does not list ({label})"] += 1
        else:
            region.value = value_of[label]
            regions.append(region)
    name = str(document.get("imagePath") or "")
    image = find_image(name, [path.parent]) if name else None
    image = image or next((p for p in sorted(path.parent.glob(f"{path.stem}.*")) if p.suffix.lower() in
                           IMAGE_SUFFIXES), None)
    if image is None and document.get("imageData"):
        image = embedded_image(document["imageData"], str(path))
    height, width = document.get("imageHeight"), document.get("imageWidth")
    if image is not None and not (isinstance(height, int) and isinstance(width, int)):
        width, height = image_size(image)
    return Annotated(path.name, image, int(height or 0), int(width or 0), regions)


class LabelMeWriter(PreLabelWriter):
    """A LabelMe file beside each image, as LabelMe saves one, which it opens as the image's annotation: a shape
    of type mask per class present (its box's corners and the base64 PNG of the box's pixels); class_names.txt
    as labelme2voc.py takes it (__ignore__, _background_, then the classes)."""

    folder = "labelme"

    def add(self, name: str, image: Path, mask: np.ndarray, confidence: np.ndarray, score: float) -> None:
        target = self.out / f"{name}{image.suffix.lower()}"
        link_or_copy(image, target)
        shapes = []
        for c in self.objects():
            bits = mask == c
            if bits.any():
                x0, y0, x1, y1 = mask_box(bits)
                shapes.append({"label": self.names[c], "points": [[x0, y0], [x1, y1]], "group_id": None,
                               "description": "", "shape_type": "mask", "flags": {},
                               "mask": png_base64(bits[y0:y1 + 1, x0:x1 + 1])})
        document = {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": target.name,
                    "imageData": None, "imageHeight": mask.shape[0], "imageWidth": mask.shape[1]}
        target.with_suffix(".json").write_text(json.dumps(document, indent=2, ensure_ascii=False))

    def close(self) -> Path:
        names = [LABELME_IGNORE, LABELME_BACKGROUND] + [self.names[c] for c in self.objects()]
        (self.out / LABELME_CLASSES).write_text("".join(f"{n}\n" for n in names))
        return super().close()


# ---- roboflow: "Semantic Segmentation Masks", NAME.jpg beside NAME_mask.png in train/, valid/, test/ ---------------

ROBOFLOW_CLASSES = "_classes.csv"  # "Pixel Value, Class" then one row per value, in each split folder
ROBOFLOW_MASK = "_mask"


def read_roboflow_classes(path: Path) -> ClassTable:
    """Roboflow's _classes.csv: a `Pixel Value, Class` header (a space after the comma), then value, name rows."""
    lines = text_lines(path)
    header = [c.strip().lower() for c in next(csv.reader([lines[0][1]]))] if lines else []
    if header[:2] != ["pixel value", "class"]:
        raise DatasetError(f"{path}: expected the header `Pixel Value, Class`, got {lines[0][1] if lines else ''!r}")
    rows = []
    for n, line in lines[1:]:
        cells = [c.strip() for c in next(csv.reader([line]))]
        if len(cells) < 2 or not cells[0].isdigit() or not cells[1] or int(cells[0]) > 65535:
            raise DatasetError(f"{path}, line {n}: expected `value, name` with a value in 0..65535, got {line!r}")
        rows.append(ClassRow(cells[1], int(cells[0])))
    if not rows:
        raise DatasetError(f"{path} lists no class")
    return ClassTable(tuple(rows), f"{path.name} with {len(rows)} classes")


def read_roboflow(root: Path) -> DatasetTree:
    """Roboflow's "Semantic Segmentation Masks": train/, valid/, test/ (or ROOT alone: split train), each with
    NAME.jpg beside NAME_mask.png and _classes.csv; mangled names (a_jpg.rf.<hash>.jpg) pair as they are."""
    folders = {"train": root} if (root / ROBOFLOW_CLASSES).is_file() else {
        d.name: d for d in sorted(root.iterdir()) if (d / ROBOFLOW_CLASSES).is_file()}
    if not folders:
        raise DatasetError(f"--layout roboflow: {root} holds no {ROBOFLOW_CLASSES}, nor a split folder with one")
    tree = DatasetTree(root, "roboflow", {})
    for split, folder in folders.items():
        table = read_roboflow_classes(folder / ROBOFLOW_CLASSES)
        if tree.table is not None and table.rows != tree.table.rows:
            first = next(iter(folders.values())) / ROBOFLOW_CLASSES
            raise DatasetError(f"{folder / ROBOFLOW_CLASSES} differs from {first}; one class table serves every split")
        tree.table = table
        files = images_by_stem(folder)
        masks = {stem: path for stem, path in files.items() if stem.endswith(ROBOFLOW_MASK)}
        images = {stem: path for stem, path in files.items() if stem not in masks}
        tree.splits[split] = pair_by_stem(images, masks, folder, ROBOFLOW_MASK)
    return tree


# ---- coco: instances JSON as CVAT ("COCO 1.0"), Roboflow and Label Studio write it ---------------------------------

# images [{id, file_name, width, height}], annotations [{image_id, category_id, segmentation: polygons [[x, y, ...]]
# or RLE {size: [h, w], counts: list or string}, iscrowd, bbox, area}], categories [{id, name, supercategory}].
# CVAT: annotations/instances_<subset>.json with images/<subset>/; Roboflow: <split>/_annotations.coco.json beside
# the images, with a first category naming the project; Label Studio: result.json with images/, ids from 0.
ROBOFLOW_COCO, CVAT_COCO, LABEL_STUDIO_COCO = "_annotations.coco.json", "instances_*.json", "result.json"
COCO_LISTS = ("images", "annotations", "categories")
COCO_FIELDS = (("id", "file_name", "width", "height"), ("image_id", "category_id"), ("id", "name"))


def coco_files(root: Path) -> dict[str, tuple[Path, list[Path]]]:
    """split -> (COCO file, folders its images may be in)."""
    found = {}
    for path in sorted((root / "annotations").glob(CVAT_COCO)):
        split = path.stem.removeprefix("instances_")
        found[split] = (path, [root / "images" / split, root / "images", root])
    for path in sorted(root.glob(f"*/{ROBOFLOW_COCO}")):
        found[path.parent.name] = (path, [path.parent])
    for path in sorted(root.glob("*.json")):  # Roboflow's and Label Studio's file, labelme2coco's annotations.json
        split = path.stem if path.stem.lower() in SPLIT_NAMES else "train"
        if split not in found and is_coco(path):
            found[split] = (path, [root, root / "images", root / VOC_IMAGES])
    return found


def is_coco(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(65536)
    return head.lstrip().startswith(b"{") and b'"images"' in head and b'"annotations"' in head


def load_coco(path: Path) -> tuple[dict, bytes]:
    """A COCO file's contents, checked for what rasterising needs, and its bytes (the cache's key)."""
    data, raw = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in COCO_LISTS):
        raise DatasetError(f"{path} is not a COCO file: a JSON object with lists images, annotations and categories")
    for key, fields in zip(COCO_LISTS, COCO_FIELDS):
        for item in data[key]:
            missing = [f for f in fields if not isinstance(item, dict) or f not in item]
            if missing:
                raise DatasetError(f"{path}: an entry of `{key}` has no {' or '.join(missing)}: {str(item)[:80]}")
    for image in data["images"]:
        if not all(isinstance(image[k], int) and not isinstance(image[k], bool) and image[k] > 0
                   for k in ("width", "height")):
            raise DatasetError(f"{path}: image {str(image['id'])[:80]} has width {str(image['width'])[:20]} and "
                               f"height {str(image['height'])[:20]}; COCO's are whole numbers of pixels")
    for key, what in (("images", "image"), ("categories", "category")):
        ids = Counter(json.dumps(item["id"]) for item in data[key])
        twice = [i for i, n in ids.items() if n > 1]
        if twice:
            raise DatasetError(f"{path}: two {key} have the id {twice[0][:80]}; each {what} needs its own, or one "
                               f"{what}'s annotations would be read as another's")
    if not all(isinstance(c["id"], (int, str)) for c in data["categories"]):
        raise DatasetError(f"{path}: a category's id is no number: {some([c['id'] for c in data['categories']])}")
    return data, raw


def coco_classes(categories: list[dict], used: set[int]) -> tuple[ClassTable, dict[int, int], int]:
    """background, then the categories in id order, less Roboflow's project category (the supercategory of every
    other, used by no annotation); the mask value of each category id, and the value of ignored pixels."""
    categories = sorted(categories, key=lambda c: c["id"])
    project = [c for c in categories if c["id"] not in used and len(categories) > 1
               and all(o.get("supercategory") == c["name"] for o in categories if o is not c)]
    kept = [c for c in categories if c not in project]
    table, by_name, ignore = shape_table([str(c["name"]) for c in kept], f"{len(kept)} categories")
    return table, {c["id"]: by_name[str(c["name"])] for c in kept}, ignore


def rle_string_counts(text: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, as pycocotools' rleFrString reads them (6-bit chunks from
    '0', a sign bit, each count after the second a difference), or None for a string that is none."""
    counts, x, k = [], 0, 0
    for char in text:
        c = ord(char) - 48
        if not 0 <= c < 64:
            return None
        x, k = x | (c & 0x1F) << 5 * k, k + 1
        if c & 0x20:
            continue
        x |= -1 << 5 * k if c & 0x10 else 0
        counts.append(x + (counts[-2] if len(counts) > 2 else 0))
        x, k = 0, 0
    return counts if k == 0 else None


def rle_fault(rle: dict, height: int, width: int) -> str | None:
    """What makes an RLE no mask of an image of height x width: pycocotools decodes its counts unchecked, so runs
    that are negative or do not add up to the image's pixels would write out of bounds, or leave pixels unset."""
    if list(rle.get("size", ())) != [height, width]:
        return f"is an RLE of size {str(rle.get('size'))[:40]}, but its image is {height}x{width}"
    counts = rle.get("counts")
    if isinstance(counts, str):
        counts = rle_string_counts(counts)
    elif not (isinstance(counts, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in counts)):
        counts = None
    if counts is None or min(counts, default=0) < 0 or sum(counts) != height * width:
        return f"has RLE counts that are no mask of {height}x{width} pixels (runs of whole numbers adding up to them)"
    return None


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def coco_region(ann: dict, height: int, width: int, where: str) -> Region | None:
    """An annotation's polygons or RLE (None for a box alone), checked before anything is rasterised."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not all(len(p) % 2 == 0 and all(map(is_number, p)) for p in polygons):
            raise DatasetError(f"{where}: annotation {str(ann.get('id'))[:40]} has a polygon that is no list of x, "
                               "y numbers")
        return Region(0, polygons=polygons) if polygons else None
    if isinstance(segmentation, dict):
        fault = rle_fault(segmentation, height, width)
        if fault:
            raise DatasetError(f"{where}: annotation {str(ann.get('id'))[:40]} {fault}")
        return Region(0, rle=segmentation)
    return None


def coco_split(root: Path, split: str, path: Path, folders: list[Path]) -> tuple[ShapeSplit, ClassTable, int, bytes]:
    """One COCO file's images, their regions and what was skipped."""
    data, raw = load_coco(path)
    used = {ann.get("category_id") for ann in data["annotations"]}
    table, value_of, ignore = coco_classes(data["categories"], used)
    annotations: dict[object, list[dict]] = {}
    for ann in data["annotations"]:
        annotations.setdefault(json.dumps(ann["image_id"]), []).append(ann)
    where, out, boxes = f"{path.relative_to(root)}", ShapeSplit(), 0
    listed = {json.dumps(image["id"]) for image in data["images"]}
    for image in data["images"]:
        regions = []
        for ann in annotations.get(json.dumps(image["id"]), []):
            region = coco_region(ann, image["height"], image["width"], str(path))
            if region is None:
                boxes += 1
                continue
            if ann["category_id"] not in value_of:
                raise DatasetError(f"{path}: annotation {ann.get('id')} has category {ann['category_id']}, which "
                                   "`categories` does not list")
            region.value = value_of[ann["category_id"]]
            regions.append(region)
        found = find_image(str(image["file_name"]), folders)
        out.images.append(Annotated(str(image["file_name"]), found, image["height"], image["width"], regions))
    if data["annotations"] and boxes == len(data["annotations"]):
        raise boxes_only(str(path), boxes)
    orphans = sum(len(v) for k, v in annotations.items() if k not in listed)
    out.findings += [f"{orphans} annotations are of images the file does not list ({where})"] if orphans else []
    unused = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"]) if c["id"] not in used
              and c["id"] in value_of]
    out.findings += [f"no annotation uses the categories {', '.join(map(str, unused))} ({where})"] if unused else []
    out.findings += [f"{boxes} annotations have no polygon or mask (boxes only): skipped ({where})"] if boxes else []
    return out, table, ignore, raw


def read_coco(root: Path) -> DatasetTree:
    """COCO files, each a split; one class table serves every split; overlaps of categories are ignored."""
    files = coco_files(root)
    if not files:
        raise DatasetError(f"--layout coco: {root} holds no annotations/{CVAT_COCO}, */{ROBOFLOW_COCO} or "
                           f"{LABEL_STUDIO_COCO}")
    splits, table, parts = {}, None, []
    for split, (path, folders) in files.items():
        with malformed(str(path)):
            splits[split], own, ignore, raw = coco_split(root, split, path, folders)
        if table is not None and own.rows != table.rows:
            raise DatasetError(f"the categories of {path} differ from those of {files[next(iter(files))][0]}; "
                               "one class table serves every split")
        table, parts = own, parts + [raw]
    return read_shapes(root, "coco", splits, table, ignore, parts, overlap_ignored=True)


class CocoWriter(PreLabelWriter):
    """COCO instances as CVAT's "COCO 1.0" export lays them out (annotations/instances_default.json, the images
    in images/default/), which CVAT, Roboflow and most tools import: one annotation per 8-connected region of a
    class, with its RLE (compressed counts), bbox, area, iscrowd 0 and score (the region's mean max softmax)."""

    folder, zipped = "coco", True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, name: str, image: Path, mask: np.ndarray, confidence: np.ndarray, score: float) -> None:
        from pycocotools import mask as mask_utils

        file_name, (height, width) = f"{name}{image.suffix.lower()}", mask.shape
        link_or_copy(image, self.out / "images" / CVAT_SUBSET / file_name)
        self.images.append({"id": len(self.images) + 1, "file_name": file_name, "width": width, "height": height})
        for category, c in enumerate(self.objects(), 1):
            labels, n = connected_regions(mask == c)
            areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            scores = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=n + 1)[1:] / np.maximum(areas, 1)
            for counts, area, score in zip(region_rles(labels, n), areas.tolist(), scores.tolist()):
                rle = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
                self.annotations.append({
                    "id": len(self.annotations) + 1, "image_id": len(self.images), "category_id": category,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                    "area": area, "bbox": [int(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
                    "score": round(score, 4),
                })

    def close(self) -> Path:
        categories = [{"id": i, "name": self.names[c], "supercategory": ""} for i, c in enumerate(self.objects(), 1)]
        document = {"info": {"description": f"predictions of {self.model_version}"}, "licenses": [],
                    "images": self.images, "annotations": self.annotations, "categories": categories}
        path = self.out / "annotations" / f"instances_{CVAT_SUBSET}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, ensure_ascii=False))
        return super().close()


# ---- yolo: Ultralytics' segmentation format, as Ultralytics, Roboflow ("YOLOv8") and Label Studio write it -----------

# data.yaml: `path` (optional), `train`/`val`/`test` (a folder of images, a list of them, or a .txt of image paths,
# relative to `path` or the yaml; Roboflow writes ../train/images), `names` (a list, or a dict by class id), `nc`.
# Label Studio writes classes.txt (a name a line), images/ and labels/. Each image's labels are the .txt at its
# path with the last images/ turned into labels/, a line per object: `class x1 y1 x2 y2 ...` normalised to [0, 1];
# a line of 4 numbers after the class is a box. Ultralytics' polygon2mask truncates the vertices to whole pixels and
# fills with cv2.fillPoly (edges included; Pillow's fill with outline draws the same), a smaller object over a larger.
YOLO_YAMLS = ("data.yaml", "data.yml", "dataset.yaml")
YOLO_CLASSES = "classes.txt"
YOLO_SPLITS = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def yolo_yaml(root: Path) -> Path | None:
    return next((root / name for name in YOLO_YAMLS if (root / name).is_file()), None)


def yolo_names(root: Path) -> tuple[list[str], str, dict]:
    """The class names (data.yaml's `names`, or classes.txt), where they are from, and the yaml's contents."""
    path = yolo_yaml(root)
    if path is None:
        names = [line for _, line in text_lines(root / YOLO_CLASSES)]
        return names, f"{YOLO_CLASSES} with {len(names)} classes", {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)] if all(str(k).isdigit() for k in names) else None
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: `names` is no list of class names, nor a dict of them by class id")
    if isinstance(data.get("nc"), int) and data["nc"] != len(names):
        raise DatasetError(f"{path}: nc is {data['nc']} but `names` lists {len(names)} classes")
    return [str(n) for n in names], f"{path.name} with {len(names)} classes", data


def yolo_split_images(root: Path, data: dict) -> dict[str, list[Path]]:
    """split -> image files, from data.yaml's paths, else images/<split>/, <split>/images/ or images/."""
    if data:
        base = root / str(data.get("path") or ".") if not Path(str(data.get("path") or ".")).is_absolute() else root
        found = {}
        for key in ("train", "val", "test"):
            for entry in ([data[key]] if isinstance(data.get(key), str) else data.get(key) or []):
                found.setdefault(key, []).extend(yolo_entry(root, base, str(entry)))
        if any(found.values()):
            return {k: v for k, v in found.items() if v}
    layouts = [(d.name, d / "images") for d in sorted(root.iterdir()) if (d / "images").is_dir()]
    if (root / "images").is_dir():
        layouts += [(d.name, d) for d in sorted((root / "images").iterdir()) if d.is_dir()]
    found = {YOLO_SPLITS.get(name, name): sorted(images_by_stem(folder, True).values()) for name, folder in layouts}
    if not found and (root / "images").is_dir():
        found = {"train": sorted(images_by_stem(root / "images", True).values())}
    return {k: v for k, v in found.items() if v}


def yolo_entry(root: Path, base: Path, entry: str) -> list[Path]:
    """The images of one data.yaml entry: a folder, or a .txt listing image paths; ../ tried as written and as
    ROOT's own (Roboflow's ../train/images is ROOT/train/images)."""
    for candidate in (base / entry, root / entry.removeprefix("../"), base / entry.removeprefix("../")):
        if candidate.is_dir():
            return sorted(images_by_stem(candidate, True).values())
        if candidate.is_file() and candidate.suffix == ".txt":
            return [candidate.parent / line for _, line in text_lines(candidate)]
    return []


def yolo_label_path(image: Path) -> Path:
    """Ultralytics' img2label_paths: the last images/ of the path becomes labels/, the suffix .txt."""
    parts = list(image.parts)
    at = max((i for i, p in enumerate(parts[:-1]) if p == "images"), default=None)
    if at is not None:
        parts[at] = "labels"
    return Path(*parts).with_suffix(".txt")


def yolo_regions(path: Path, width: int, height: int, classes: int, counts: Counter) -> tuple[list[Region], bytes]:
    """A label file's polygons, larger first (Ultralytics paints smaller objects on top); boxes are counted."""
    raw = path.read_bytes()
    regions = []
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        cells = line.split()
        if not cells:
            continue
        try:
            cls, xy = int(cells[0]), np.array([float(v) for v in cells[1:]])
        except ValueError:
            raise DatasetError(f"{path}, line {n}: expected `class x1 y1 x2 y2 ...`, got {line[:60]!r}") from None
        if not 0 <= cls < classes:
            raise DatasetError(f"{path}, line {n}: class {cls} is outside the {classes} classes of the names")
        if len(xy) == 4:
            counts["boxes"] += 1
        elif not np.isfinite(xy).all() or not ((xy >= -1) & (xy <= 2)).all():
            raise DatasetError(f"{path}, line {n}: coordinates not normalised to 0..1 (Ultralytics refuses such a "
                               f"label file): {line[:60]!r}")
        elif len(xy) >= 6 and len(xy) % 2 == 0:  # polygon2mask: vertices truncated to whole pixels, edges filled
            points = (xy.reshape(-1, 2) * (width, height)).astype(np.int64)
            regions.append(Region(cls + 1, drawing=("polygon", [tuple(p) for p in points.tolist()])))
        else:
            raise DatasetError(f"{path}, line {n}: {len(xy)} coordinates, neither a box (4) nor a polygon (6 or more)")
    areas = [abs(polygon_area(r.drawing[1])) for r in regions]
    return [regions[i] for i in np.argsort(areas, kind="stable")[::-1]], raw


def polygon_area(xy: list[tuple[float, float]]) -> float:
    x, y = np.asarray(xy, float).T
    return 0.5 * float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def read_yolo(root: Path) -> DatasetTree:
    """YOLO segmentation labels, each split's polygons rasterised over background (class 0); the classes are
    `names` (or classes.txt) after it. An empty label file is an image of background only (Ultralytics'
    background image); an image with no label file is skipped and counted."""
    names, source, data = yolo_names(root)
    table, _, ignore = shape_table([f"{n}" for n in names], source)
    if len(table.names) != len(names) + 1:
        raise DatasetError(f"{source}: a class name is listed twice, or is `background`")
    splits, parts, counts = {}, [], Counter()
    for split, images in yolo_split_images(root, data).items():
        splits[split], unlabelled = ShapeSplit(), []
        for image in images:
            label = yolo_label_path(image)
            if not label.is_file() or not image.is_file():
                unlabelled.append(image.name)
                continue
            width, height = image_size(image)
            regions, raw = yolo_regions(label, width, height, len(names), counts)
            empty = not raw.strip()
            splits[split].images.append(Annotated(image.name, image, height, width, regions, background=empty))
            parts.append(f"{label.relative_to(root)} {width}x{height}".encode() + raw)
            counts["background"] += empty
        splits[split].findings += [f"{len(unlabelled)} images have no label file: skipped ({some(unlabelled)})"
                                   ] if unlabelled else []
    if counts["boxes"] and not any(a.regions for s in splits.values() for a in s.images):
        raise boxes_only(f"the YOLO labels of {root}", counts["boxes"])
    tree = read_shapes(root, "yolo", splits, table, ignore, parts)
    tree.findings += [f"{counts['boxes']} labels are boxes (no polygon): skipped"] if counts["boxes"] else []
    tree.notes += [f"{counts['background']} images have an empty label file: read as background only"
                   ] if counts["background"] else []
    return tree


# ---- via: VGG Image Annotator 1 and 2, via_region_data.json or a project's JSON -------------------------------------

# {KEY: {"filename", "size", "regions": [{"shape_attributes": {"name": "polygon", "all_points_x", "all_points_y"} |
# {"name": "rect", x, y, width, height} | {"name": "circle", cx, cy, r} | {"name": "ellipse", cx, cy, rx, ry, theta},
# "region_attributes": {ATTRIBUTE: "class" | {"class": true}}}], "file_attributes"}} (VIA 1 keeps `regions` as a
# dict by index); a project file holds that under _via_img_metadata, and its attributes (with their options, the
# classes in order) under _via_attributes.region. VIA has no mask export: regions are painted in file order.
VIA_CLASS_KEYS = ("class", "label", "name", "type", "category", "object")
VIA_ONE_CLASS = "object"


def via_files(root: Path) -> dict[str, list[Path]]:
    """split -> VIA JSON files: those in ROOT are split train, each folder's are its split."""

    def found(folder: Path) -> list[Path]:
        return [p for p in sorted(folder.glob("*.json")) if is_via(p)]

    own = found(root)
    splits = {"train": own} if own else {}
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_NAMES and not own]
    return splits | {d.name: found(d) for d in folders if found(d)}


def is_via(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(65536)
    return b"_via_img_metadata" in head or (b'"regions"' in head and b'"filename"' in head)


def via_images(path: Path, document: object) -> tuple[list[dict], dict]:
    """A VIA file's image entries, and its region attributes' declarations (a project's)."""
    if isinstance(document, dict) and "_via_img_metadata" in document:
        attributes = (document.get("_via_attributes") or {}).get("region") or {}
        return list((document["_via_img_metadata"] or {}).values()), attributes
    if isinstance(document, dict) and all(isinstance(v, dict) and "filename" in v for v in document.values()):
        return list(document.values()), {}
    raise DatasetError(f"{path} is no VIA file: image entries with `filename` and `regions`")


def via_regions(entry: dict) -> list[dict]:
    """An image entry's regions (VIA 1 keeps them in a dict by index), each an object."""
    regions = entry.get("regions") or []
    regions = list(regions.values()) if isinstance(regions, dict) else list(regions)
    if not all(isinstance(r, dict) for r in regions):
        raise TypeError(f"the regions of {entry.get('filename')!r} are not objects")
    return regions


def via_class_key(attributes: dict, regions: list[dict]) -> tuple[str | None, list[str]]:
    """The region attribute that names the class, and the classes it declares (a project's options, in order)."""
    for key, spec in attributes.items():
        if isinstance(spec, dict) and spec.get("type") in ("dropdown", "radio", "checkbox") and spec.get("options"):
            return key, [str(option) for option in spec["options"]]
    keys = list(dict.fromkeys(k for r in regions for k in (r.get("region_attributes") or {})))
    key = next((k for k in keys if k.lower() in VIA_CLASS_KEYS), keys[0] if len(keys) == 1 else None)
    return key, []


def via_class(region: dict, key: str | None) -> str | None:
    value = (region.get("region_attributes") or {}).get(key) if key else VIA_ONE_CLASS
    if isinstance(value, dict):  # a checkbox: {"car": true}
        value = next((k for k, on in value.items() if on), None)
    return str(value).strip() or None if value is not None else None


def via_polygon(shape: dict) -> list[float] | None:
    name, get = shape.get("name"), lambda k: float(shape.get(k, 0))
    if name == "polygon":
        xy = list(zip(shape.get("all_points_x") or [], shape.get("all_points_y") or []))
        return [float(v) for point in xy for v in point] if len(xy) >= 3 else None
    if name == "rect":
        return box_polygon(get("x"), get("y"), get("x") + get("width"), get("y") + get("height"))
    if name == "circle":
        return ellipse(get("cx"), get("cy"), get("r"), get("r"))
    if name == "ellipse":
        return ellipse(get("cx"), get("cy"), get("rx"), get("ry"), get("theta"))
    return None


def read_via(root: Path) -> DatasetTree:
    """VIA's regions painted in file order over background; the classes are the class attribute's options (a
    project's) or its values in the order first used; with no class attribute at all, one class."""
    files, documents, parts, regions = via_files(root), {}, [], []
    for path in (p for split in files.values() for p in split):
        document, raw = read_json(path)
        with malformed(str(path)):  # every file's regions, each checked to be an object
            documents[path], parts = via_images(path, document), parts + [raw]
            regions += [r for e in documents[path][0] for r in via_regions(e)]
    key, declared = via_class_key(next((a for _, a in documents.values() if a), {}), regions)
    names = declared or [n for n in dict.fromkeys(via_class(r, key) for r in regions) if n]
    table, value_of, ignore = shape_table(names, f"{len(names)} classes of region attribute {key!r}" if key
                                          else f"one class ({VIA_ONE_CLASS}: no region attribute names a class)")
    splits, skipped = {}, Counter()
    for split, paths in files.items():
        splits[split] = ShapeSplit()
        for path in paths:
            for entry in documents[path][0]:
                with malformed(f"{path}, image {entry.get('filename')!r}"):
                    splits[split].images.append(via_image(path, entry, key, value_of, skipped))
    if not any(a.regions for s in splits.values() for a in s.images) and skipped:
        raise boxes_only(f"the VIA files of {root}", sum(skipped.values()))
    tree = read_shapes(root, "via", splits, table, ignore, parts)
    tree.findings += [f"{n} regions {what}: skipped" for what, n in skipped.items()]
    return tree


def via_image(path: Path, entry: dict, key: str | None, value_of: dict[str, int], skipped: Counter) -> Annotated:
    image = find_image(str(entry.get("filename", "")), [path.parent, path.parent / "images", path.parent.parent])
    width, height = image_size(image) if image is not None else (0, 0)
    regions = []
    for region in via_regions(entry):
        polygon, name = via_polygon(region.get("shape_attributes") or {}), via_class(region, key)
        if polygon is None:
            skipped[f"of shape {(region.get('shape_attributes') or {}).get('name')} (no area)"] += 1
        elif name is None:
            skipped[f"with no {key!r} attribute (no class)"] += 1
        elif name not in value_of:
            skipped[f"of class {name!r}, which the attribute's options do not list"] += 1
        else:
            regions.append(Region(value_of[name], polygons=[polygon]))
    return Annotated(str(entry.get("filename", "")), image, height, width, regions)


# ---- label studio: its JSON export (polygons and brush masks); its COCO and YOLO exports read above -----------------

# [{"id", "data": {"image": "/data/upload/1/3f2a9c1d-frame.jpg" or "/data/local-files/?d=images/frame.jpg"},
# "annotations": [{"was_cancelled", "result": [{"type": "polygonlabels", "value": {"points": [[x%, y%], ...],
# "polygonlabels": [name]}, "original_width", "original_height"} | {"type": "brushlabels", "value": {"format":
# "rle", "rle": [...], "brushlabels": [name]}} | {"type": "ellipselabels", "value": {x%, y%, radiusX%, radiusY%,
# rotation}} | {"type": "rectanglelabels", ...}]}]}]. Brush RLE (label-studio-converter's brush.py) is a bit stream
# over the RGBA buffer: 32 bits of length, 5 of word size - 1, four 4-bit run-length sizes - 1, then runs, each a
# flag bit (1: one value repeated), 2 bits choosing a run-length size, the run length - 1, and the value(s).
LABEL_STUDIO_JSON = ("result.json", "export.json", "tasks.json")
LABEL_STUDIO_UPLOAD_PREFIX = 9  # "3f2a9c1d-": the 8 hex digits and dash it puts before an uploaded file's name
LABEL_STUDIO_FROM = "tag"  # the name of the BrushLabels its templates use


class BitReader:
    """Reads whole numbers of n bits, most significant first, from a byte string."""

    def __init__(self, data: bytes):
        self.bits, self.at = "".join(f"{byte:08b}" for byte in data), 0

    def read(self, n: int) -> int:
        value = int(self.bits[self.at:self.at + n] or "0", 2)
        self.at += n
        return value


def decode_brush_rle(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio's brush RLE -> a boolean mask [height, width] (the alpha channel of its RGBA buffer)."""
    stream = BitReader(bytes(rle))
    total, word = stream.read(32), stream.read(5) + 1
    sizes = [stream.read(4) + 1 for _ in range(4)]
    if total != height * width * 4:
        raise ValueError(f"the RLE holds {total} values, not {height}x{width}x4")
    out, i = np.zeros(total, np.uint8), 0
    while i < total:
        repeat = stream.read(1)
        j = i + 1 + stream.read(sizes[stream.read(2)])
        if repeat:
            out[i:j] = stream.read(word)
        else:
            out[i:j] = [stream.read(word) for _ in range(j - i)]
        i = j
    return out.reshape(height, width, 4)[..., 3] > 0


def label_studio_region(result: dict, where: str) -> tuple[str | None, Region | None]:
    """A result's class name and region (None for a box, a keypoint or a choice)."""
    value, kind = result.get("value") or {}, result.get("type", "")
    height, width = int(result.get("original_height") or 0), int(result.get("original_width") or 0)
    names = value.get(kind) or []
    name = str(names[0]) if names else None
    if kind == "polygonlabels" and len(value.get("points") or []) >= 3:
        return name, Region(0, polygons=[[v / 100 * size for x, y in value["points"]
                                          for v, size in ((x, width), (y, height))]])
    if kind == "ellipselabels":
        x, y, rx, ry = (float(value.get(k, 0)) / 100 for k in ("x", "y", "radiusX", "radiusY"))
        turn = math.radians(float(value.get("rotation", 0)))
        return name, Region(0, polygons=[ellipse(x * width, y * height, rx * width, ry * height, turn)])
    if kind == "brushlabels" and value.get("format") == "rle":
        rle = value.get("rle")
        if not isinstance(rle, list) or len(rle) < 8 or BitReader(bytes(rle[:4])).read(32) != height * width * 4:
            raise DatasetError(f"{where}: a brush mask whose RLE is not of its {height}x{width} image")
        return name, Region(0, decode=partial(decode_brush_rle, rle))
    return name, None


def label_studio_image(root: Path, url: str) -> tuple[str, Path | None]:
    """The name and file of a task's image URL: a local file's path (`?d=images/a%20b.jpg`) relative to ROOT, or
    its name in ROOT/images or ROOT (an upload's without the prefix Label Studio gives it)."""
    path = urllib.parse.unquote(url.split("?d=")[-1] if "?d=" in url else urllib.parse.urlparse(url).path)
    name, folders = PurePosixPath(path).name, [root / "images", root]
    if path and not path.startswith("/") and ".." not in PurePosixPath(path).parts and (root / path).is_file():
        return name, root / path
    return name, find_image(name, folders) or find_image(name[LABEL_STUDIO_UPLOAD_PREFIX:], folders)


def label_studio_json(root: Path) -> Path | None:
    for name in LABEL_STUDIO_JSON:
        path = root / name
        if path.is_file():
            with path.open("rb") as f:
                head = f.read(65536)
            if head.lstrip().startswith(b"[") and b'"data"' in head and b'"annotations"' in head:
                return path
    return None


def read_label_studio(root: Path) -> DatasetTree:
    """Label Studio's JSON: each task's first annotation not cancelled, its regions painted in order over
    background, the classes in the order first used; images by their file name in ROOT/images or ROOT."""
    path = label_studio_json(root)
    document, raw = read_json(path)
    if not isinstance(document, list):
        raise DatasetError(f"{path} is no Label Studio export: a list of tasks")
    with malformed(str(path)):
        return label_studio_tree(root, path, document, raw)


def label_studio_tree(root: Path, path: Path, document: list, raw: bytes) -> DatasetTree:
    tasks = []
    for task in document:
        done = [a for a in (task.get("annotations") or []) if not a.get("was_cancelled")]
        tasks.append((task, (done[0].get("result") or []) if done else []))
    regions = [(task, label_studio_region(r, f"{path}, task {task.get('id')}")) for task, results in tasks
               for r in results]
    table, value_of, ignore = shape_table([n for _, (n, region) in regions if n and region], "labels of the tasks")
    split, skipped = ShapeSplit(), Counter()
    for task, results in tasks:
        name, image = label_studio_image(root, str((task.get("data") or {}).get("image", "")))
        own = [label_studio_region(r, str(path)) for r in results]
        skipped.update(f"of type {r.get('type')} (no area)" for r, (_, region) in zip(results, own) if region is None)
        kept = [replace(region, value=value_of[n]) for n, region in own if region and n]
        size = next(((int(r.get("original_height") or 0), int(r.get("original_width") or 0)) for r in results), None)
        height, width = size or (image_size(image)[::-1] if image else (0, 0))
        split.images.append(Annotated(name, image, height, width, kept))
    if not any(a.regions for a in split.images) and skipped:
        raise boxes_only(str(path), sum(skipped.values()))
    tree = read_shapes(root, "label-studio", {"train": split}, table, ignore, [raw])
    tree.findings += [f"{n} results {what}: skipped" for what, n in skipped.items()]
    return tree


LABEL_STUDIO_RUN_SIZES = (3, 4, 8, 16)  # label-studio-converter's rle_sizes: bits of a run's length - 1
LABEL_STUDIO_LOCAL_FILES = "/data/local-files/?d="  # its local storage, under LOCAL_FILES_DOCUMENT_ROOT
LABEL_STUDIO_TASKS, LABEL_STUDIO_CONFIG = "tasks.json", "labeling_config.xml"


def encode_brush_rle(bits: np.ndarray) -> list[int]:
    """A boolean mask -> Label Studio's brush RLE, as label-studio-converter's mask2rle encodes it: the RGBA
    buffer, every byte 255 inside and 0 outside, in runs of one value, each run's length in the smallest of
    its run-length sizes that holds it (runs over 2^16 split)."""
    flat = np.repeat(bits.ravel().astype(np.uint8) * 255, 4)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1])
    lengths = np.diff(np.append(starts, flat.size))
    longest = 2 ** LABEL_STUDIO_RUN_SIZES[-1]
    pieces = -(-lengths // longest)
    values, runs = np.repeat(flat[starts], pieces), np.full(pieces.sum(), longest)
    runs[np.cumsum(pieces) - 1] = lengths - (pieces - 1) * longest
    sizes = np.array(LABEL_STUDIO_RUN_SIZES)
    choice = np.argmax((runs[:, None] - 1) < 2 ** sizes[None, :], axis=1)
    width = 1 + 2 + sizes[choice] + 8  # repeat flag, size choice, length - 1, the byte
    code = (1 << (width - 1)) | (choice << (sizes[choice] + 8)) | ((runs - 1) << 8) | values
    header = f"{flat.size:032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in LABEL_STUDIO_RUN_SIZES)
    widest = int(width.max())
    table = (code[:, None] >> np.arange(widest - 1, -1, -1)) & 1
    body = table[np.arange(widest)[None, :] >= widest - width[:, None]]
    stream = np.concatenate([np.array(list(header), np.uint8), body.astype(np.uint8)])
    return np.packbits(stream).tolist()  # zero-padded to whole bytes


def labeling_config(names: list[str], colours: list[tuple[int, int, int]]) -> str:
    """The labeling config XML of a project these predictions fit: a BrushLabels over the image, a Label per
    class in its colour."""
    labels = "".join(f'    <Label value="{html.escape(n)}" background="#{r:02x}{g:02x}{b:02x}"/>\n'
                     for n, (r, g, b) in zip(names, colours))
    return (f'<View>\n  <Image name="image" value="$image" zoom="true"/>\n  <BrushLabels name="{LABEL_STUDIO_FROM}" '
            f'toName="image">\n{labels}  </BrushLabels>\n</View>\n')


class LabelStudioWriter(PreLabelWriter):
    """Label Studio tasks whose predictions are brush masks, to import into a project of labeling_config.xml:
    tasks.json (data.image the image's URL, --image-url then images/NAME; a prediction per task with a
    brushlabels result per class present, model_version, and score, the estimated share of pixels right, so that
    sorting by prediction score puts the images most worth labelling first) and the images in images/."""

    folder = "label-studio"

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.tasks: list[dict] = []

    def add(self, name: str, image: Path, mask: np.ndarray, confidence: np.ndarray, score: float) -> None:
        relative = f"images/{name}{image.suffix.lower()}"
        link_or_copy(image, self.out / relative)
        (height, width), results = mask.shape, []
        for c in self.objects():
            bits = mask == c
            if bits.any():
                results.append({"id": f"{len(self.tasks) + 1}-{c}", "from_name": LABEL_STUDIO_FROM,
                                "to_name": "image", "type": "brushlabels", "original_width": width,
                                "original_height": height, "image_rotation": 0,
                                "value": {"format": "rle", "rle": encode_brush_rle(bits),
                                          "brushlabels": [self.names[c]]}})
        prediction = {"model_version": self.model_version, "score": round(1 - score, 4), "result": results}
        self.tasks.append({"data": {"image": self.image_url + urllib.parse.quote(relative)},
                           "predictions": [prediction]})

    def close(self) -> Path:
        (self.out / LABEL_STUDIO_TASKS).write_text(json.dumps(self.tasks, ensure_ascii=False))
        objects = self.objects()
        config = labeling_config([self.names[c] for c in objects], [self.colours[c] for c in objects])
        (self.out / LABEL_STUDIO_CONFIG).write_text(config)
        return super().close()

# ---- zips: an export as the tool hands it over --------------------------------------------------------------------

ZIP_RATIO, ZIP_FLOOR = 200, 256 * 2**20  # an archive unpacking to more than both (x its size, bytes) is refused


def check_zip(path: Path, archive: zipfile.ZipFile, target: Path) -> None:
    """Refuse, with one line, a member whose path would land outside `target` (absolute, ../, a drive, a link),
    and an archive that would unpack to an absurd size against its own (a zip bomb)."""
    for info in archive.infolist():
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in (parts[0] if parts else ""):
            raise DatasetError(f"--data {path}: member {info.filename!r} would land outside {target}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DatasetError(f"--data {path}: member {info.filename!r} is a link; links are not unpacked")
    size, packed = sum(info.file_size for info in archive.infolist()), path.stat().st_size
    if size > ZIP_RATIO * packed and size > ZIP_FLOOR:
        raise DatasetError(f"--data {path}: it would unpack to {size:,} bytes, {size / packed:.0f} times its own "
                           "size; unpack it yourself if you trust it")


def unpack_zip(path: Path) -> tuple[Path, str]:
    """An export's .zip, unpacked once into NAME_unzipped/ beside it and reused while the zip is unchanged (its
    size and time, kept in a marker file there), and the line that says so. Another process of the same run
    (torchrun) may unpack it at the same time: the first to finish wins, the other's copy is dropped."""
    target = path.with_name(f"{path.stem}_unzipped")
    stamp = f"{path.name} {path.stat().st_size} {path.stat().st_mtime_ns}"
    marker = target / ".unzipped-from"
    done = lambda: marker.is_file() and marker.read_text() == stamp  # noqa: E731
    if done():
        return target, f"{path}: unpacked before into {target}"
    if target.exists() and not marker.is_file():
        raise DatasetError(f"--data {path}: {target} exists and was not unpacked from it; move it away")
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip(path, archive, target)
            shutil.rmtree(partial, ignore_errors=True)
            archive.extractall(partial)
            files = sum(not info.is_dir() for info in archive.infolist())
        (partial / marker.name).write_text(stamp)
        if target.exists() and not done():
            shutil.rmtree(target)  # unpacked from an older version of the zip
        partial.rename(target)
    except (zipfile.BadZipFile, OSError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        if not done():
            raise DatasetError(f"--data {path}: cannot unpack it ({e})") from None
        return target, f"{path}: unpacked into {target} by another process of this run"
    return target, f"{path}: unpacked {files} files into {target}"


# ---- which tool wrote a folder --------------------------------------------------------------------------------------

def yolo_sources(root: Path) -> list[Path]:
    """data.yaml (or classes.txt) and every label file of the splits' images."""
    names = yolo_yaml(root) or root / YOLO_CLASSES
    labels = [yolo_label_path(image) for images in yolo_split_images(root, yolo_names(root)[2]).values()
              for image in images]
    return [names] + [label for label in labels if label.is_file()]


TOOL_READERS: dict[str, Callable[[Path], DatasetTree]] = {
    "voc": lambda root: read_voc_like(root, "voc"),
    "cvat": read_cvat_masks,
    "cvat-xml": cached_tree("cvat-xml", read_cvat_xml, lambda root: [root / CVAT_XML]),
    "labelme": read_labelme_tree,
    "labelme-json": cached_tree("labelme-json", read_labelme_json, lambda root: [
        *(p for files in labelme_jsons(root).values() for p in files), *labelme_label_files(root)]),
    "roboflow": read_roboflow,
    "coco": cached_tree("coco", read_coco, lambda root: [path for path, _ in coco_files(root).values()]),
    "yolo": cached_tree("yolo", read_yolo, yolo_sources),
    "via": cached_tree("via", read_via, lambda root: [p for files in via_files(root).values() for p in files]),
    "label-studio": cached_tree("label-studio", read_label_studio, lambda root: [label_studio_json(root)]),
}
PRE_LABEL_WRITERS: dict[str, type[PreLabelWriter]] = {
    "cvat": CvatMaskWriter, "coco": CocoWriter, "label-studio": LabelStudioWriter, "labelme": LabelMeWriter,
}
def labelme_split_trees(root: Path) -> bool:
    """labelme2voc.py's trees, one per split folder, each with its class_names.txt."""
    return any(d.name.lower() in SPLIT_NAMES and voc_base(d) and (d / LABELME_CLASSES).is_file()
               for d in sorted(root.iterdir()) if d.is_dir())


# What each tool's export holds, and how to see it: detect_tool tries them in this order (the VOC-like trees first,
# told apart by labelmap.txt and the lists), and a forced --layout must find its own
TOOL_SIGNS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "voc": ("JPEGImages/ beside SegmentationClass/", lambda root: voc_base(root) is not None),
    "cvat": ("JPEGImages/ beside SegmentationClass/ and labelmap.txt", lambda root: voc_base(root) is not None),
    "labelme": ("JPEGImages/ beside SegmentationClass/, or one such tree per split",
                lambda root: voc_base(root) is not None or labelme_split_trees(root)),
    "roboflow": (f"{ROBOFLOW_CLASSES} in ROOT or in a split folder", lambda root: (root / ROBOFLOW_CLASSES).is_file()
                 or any((d / ROBOFLOW_CLASSES).is_file() for d in root.iterdir() if d.is_dir())),
    "cvat-xml": (CVAT_XML, lambda root: (root / CVAT_XML).is_file()),
    "yolo": (f"data.yaml, or {YOLO_CLASSES} beside labels/", lambda root: yolo_yaml(root) is not None
             or ((root / YOLO_CLASSES).is_file() and (root / "labels").is_dir())),
    "label-studio": ("Label Studio JSON export", lambda root: label_studio_json(root) is not None),
    "coco": ("COCO file (annotations/instances_*.json, */_annotations.coco.json, result.json, ...)",
             lambda root: bool(coco_files(root))),
    "labelme-json": ("LabelMe JSON files beside the images", lambda root: bool(labelme_jsons(root))),
    "via": ("VIA JSON (via_region_data.json or a project file)", lambda root: bool(via_files(root))),
}
TOOL_FILES = (f"JPEGImages + SegmentationClass (voc, cvat, labelme), SPLIT/{ROBOFLOW_CLASSES} (roboflow), a COCO "
              f"file (coco), {CVAT_XML} (cvat-xml), data.yaml or {YOLO_CLASSES} + labels/ (yolo), LabelMe's JSON "
              f"files (labelme-json), VIA's JSON (via) or Label Studio's JSON (label-studio)")


def detect_tool(root: Path) -> str | None:
    """The tool whose export `root` is, from the folders and files each writes; None for none of them."""
    base = voc_base(root)
    if base is not None:
        return "cvat" if (base / CVAT_LABELMAP).is_file() else "voc" if (base / VOC_LISTS).is_dir() else "labelme"
    return next((tool for tool, (_, seen) in TOOL_SIGNS.items() if tool not in ("voc", "cvat") and seen(root)), None)
