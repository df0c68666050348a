"""Segmentation datasets: the offroad, Cityscapes, folder and demo layouts, transforms and class statistics.

Every layout yields (image, mask) pairs: a normalised float image [3, H, W] and an int64 mask [H, W] of
class indices, with IGNORE_INDEX (255) wherever the raw mask value is outside the layout's class map.

    python dataset.py --data ROOT --split train --stats
"""

import argparse
import colorsys
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision.datasets import Cityscapes
from tqdm import tqdm

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("auto", "offroad", "cityscapes", "folder", "demo")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

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


class DatasetError(Exception):
    """Bad input data: the message names the file or folder and is shown to the user as one line."""


@dataclass(frozen=True)
class ClassMap:
    """How raw mask values become class indices.

    lut[v] is the class index (or IGNORE_INDEX) of raw value v; known[v] is False for values outside the
    map, which are ignored too but counted and reported, since they usually mean a wrong layout.
    """

    names: tuple[str, ...]
    lut: np.ndarray
    known: np.ndarray
    palette: np.ndarray  # [num_classes, 3] uint8 colours for pictures of masks

    @classmethod
    def from_pairs(cls, names: tuple[str, ...], pairs: dict[int, int], palette: np.ndarray | None = None) -> "ClassMap":
        lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
        known = np.zeros(65536, dtype=bool)
        for raw, index in pairs.items():
            lut[raw] = index
            known[raw] = True
        return cls(names, lut, known, distinct_palette(len(names)) if palette is None else palette)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def apply(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        """Map a raw mask (values 0..65535) to class indices; also count the pixels with an unknown value."""
        return self.lut[raw], int(raw.size - np.count_nonzero(self.known[raw]))


def distinct_palette(n: int) -> np.ndarray:
    """n well-separated colours: hues stepped by the golden ratio, alternating saturation and brightness."""
    colours = [
        colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.9 - 0.35 * (i % 2), 0.95 - 0.3 * ((i // 2) % 2)) for i in range(n)
    ]
    return (np.array(colours) * 255).round().astype(np.uint8).reshape(n, 3)


def offroad_class_map() -> ClassMap:
    return ClassMap.from_pairs(
        tuple(name for _, name in OFFROAD_CLASSES), {raw: i for i, (raw, _) in enumerate(OFFROAD_CLASSES)}
    )


def cityscapes_class_map() -> ClassMap:
    evaluated = sorted((c for c in Cityscapes.classes if 0 <= c.train_id < IGNORE_INDEX), key=lambda c: c.train_id)
    pairs = {
        c.id: c.train_id if 0 <= c.train_id < IGNORE_INDEX else IGNORE_INDEX for c in Cityscapes.classes if c.id >= 0
    }
    palette = np.array([c.color for c in evaluated], dtype=np.uint8)  # Cityscapes' own colours
    return ClassMap.from_pairs(tuple(c.name for c in evaluated), pairs, palette)


def palette_for(names: list[str]) -> np.ndarray:
    """Cityscapes' own colours for its 19 classes, distinct colours for any other class list."""
    cityscapes = cityscapes_class_map()
    return cityscapes.palette if tuple(names) == cityscapes.names else distinct_palette(len(names))


def folder_class_map(num_classes: int, class_names: list[str] | None = None) -> ClassMap:
    names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(num_classes))
    if len(names) != num_classes:
        raise DatasetError(f"--class-names gives {len(names)} names but --num-classes is {num_classes}")
    pairs = {i: i for i in range(num_classes)}
    pairs[IGNORE_INDEX] = IGNORE_INDEX
    return ClassMap.from_pairs(names, pairs)


def detect_layout(root: Path, split: str) -> str:
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / split / "Color_Images").is_dir():
        return "offroad"
    if (root / split / "images").is_dir():
        return "folder"
    raise DatasetError(
        f"cannot detect the layout of {root}: expected {split}/Color_Images (offroad), "
        f"leftImg8bit + gtFine (cityscapes) or {split}/images + {split}/masks (folder)"
    )


def _pairs_by_stem(image_dir: Path, mask_dir: Path, mask_name) -> list[tuple[Path, Path]]:
    if not image_dir.is_dir():
        raise DatasetError(f"missing folder {image_dir}")
    if not mask_dir.is_dir():
        raise DatasetError(f"missing mask folder {mask_dir}")
    pairs = []
    for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = mask_dir / mask_name(image)
        if not mask.is_file():
            raise DatasetError(f"image {image} has no mask (expected {mask})")
        pairs.append((image, mask))
    return pairs


def list_pairs(root: Path, layout: str, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of one split, in a stable order."""
    if layout == "offroad":
        return _pairs_by_stem(root / split / "Color_Images", root / split / "Segmentation", lambda p: p.stem + ".png")
    if layout == "folder":
        return _pairs_by_stem(root / split / "images", root / split / "masks", lambda p: p.stem + ".png")
    if layout == "cityscapes":
        image_root, pairs = root / "leftImg8bit" / split, []
        if not image_root.is_dir():
            raise DatasetError(f"missing folder {image_root}")
        for city in sorted(p for p in image_root.iterdir() if p.is_dir()):
            pairs += _pairs_by_stem(
                city,
                root / "gtFine" / split / city.name,
                lambda p: p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"),
            )
        return pairs
    raise DatasetError(f"unknown --layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def read_mask(path: Path) -> np.ndarray:
    """The mask's raw values, unchanged (16-bit PNGs stay 16-bit)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(f"mask {path} has mode {im.mode}; expected a single-channel PNG of ids")
            raw = np.asarray(im)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}") from None
    return raw if raw.dtype in (np.uint8, np.uint16) else np.clip(raw, 0, 65535)  # indexes the 65536-entry maps


def read_image(path: Path) -> torch.Tensor:
    """uint8 RGB tensor [3, H, W]."""
    try:
        with Image.open(path) as im:
            rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # one copy, writable
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None


@dataclass(frozen=True)
class TransformConfig:
    """size: resize to (H, W) first (None keeps each image's size); scale: random scale range;
    crop: random crop (H, W), padding masks with IGNORE_INDEX; train: enables the random parts."""

    size: tuple[int, int] | None = None
    scale: tuple[float, float] | None = None
    crop: tuple[int, int] | None = None
    hflip: bool = True
    augment: bool = False
    train: bool = True


def transform_pair(
    image: torch.Tensor, mask: torch.Tensor, cfg: TransformConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image [3, H, W] and uint8 mask [H, W] -> uint8 image [3, h, w] and int64 mask [h, w]. The random
    choices come from `generator` (default: torch's global one).

    The image stays uint8 (4x less to copy to the device); `normalize` runs on the device. With a crop, only the
    source region under the crop is resized: at scale 2 that is a quarter of the image, not four times it.
    """
    h0, w0 = image.shape[-2:]
    hb, wb = cfg.size or (h0, w0)
    g = generator
    s = float(torch.empty(1).uniform_(*cfg.scale, generator=g)) if cfg.train and cfg.scale else 1.0
    hs, ws = max(1, round(hb * s)), max(1, round(wb * s))  # size of the whole image after resizing
    mask = mask[None]
    if cfg.train and cfg.crop is not None:
        out_h, out_w = min(cfg.crop[0], hs), min(cfg.crop[1], ws)
        win_h, win_w = max(1, round(out_h * h0 / hs)), max(1, round(out_w * w0 / ws))  # the crop, in source pixels
        top = int(torch.randint(0, h0 - win_h + 1, (1,), generator=g))
        left = int(torch.randint(0, w0 - win_w + 1, (1,), generator=g))
        image, mask = (
            image[..., top : top + win_h, left : left + win_w],
            mask[..., top : top + win_h, left : left + win_w],
        )
        image, mask = _resize_pair(image, mask, (out_h, out_w))
        pad_h, pad_w = cfg.crop[0] - out_h, cfg.crop[1] - out_w
        if pad_h or pad_w:  # pad right/bottom; padded pixels are ignored by the loss and the metrics
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
    else:
        image, mask = _resize_pair(image, mask, (hs, ws))
    if cfg.train:
        if cfg.hflip and torch.rand(1, generator=g).item() < 0.5:
            image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
        if cfg.augment:
            image = colour_jitter(image, g)
    return image, mask[0].long()


def colour_jitter(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02), in random order, from `generator`."""
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
            image = TF.adjust_hue(image, -0.02 + 0.04 * float(factors[3]))
    return image


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    image = TF.resize(image, list(size), antialias=True)
    return image, TF.resize(mask, list(size), interpolation=T.InterpolationMode.NEAREST)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 with ImageNet mean and std; run it on the device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255 - mean) / std


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
        unknown = 0
        for i, (image_path, mask_path) in enumerate(tqdm(pairs, desc=f"caching into {self.root}", disable=None)):
            a, b = self.offsets[i], self.offsets[i + 1]
            images[3 * a : 3 * b] = read_image(image_path).permute(1, 2, 0).numpy().ravel()
            mask, n = class_map.apply(read_mask(mask_path))
            masks[a:b], unknown = mask.ravel(), unknown + n
        images.flush()
        masks.flush()
        if unknown:
            print(f"warning: {unknown} mask pixels have values outside the class map; they are ignored (255)")
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
    digest = hashlib.sha1(class_map.lut.tobytes())
    for image, mask in pairs:
        for path in (image, mask):
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "deeplab_decoded" / digest.hexdigest()[:16]


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
    fails before training starts and names the file. With cache=True the decoded split is kept on disk."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        class_map: ClassMap,
        transform: TransformConfig,
        cache: bool = False,
        seed: int = 0,
    ):
        sizes = []
        for image, mask in pairs:
            (iw, ih), (mw, mh) = image_size(image), image_size(mask)
            if (iw, ih) != (mw, mh):
                raise DatasetError(f"mask {mask} is {mw}x{mh} but image {image} is {iw}x{ih}")
            sizes.append((iw, ih))
        self.pairs, self.class_map, self.transform = pairs, class_map, transform
        self.cache = DecodedCache(cache_dir(pairs, class_map), pairs, sizes, class_map) if cache else None
        self.reported_unknown = False
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """key: an index, or (epoch, index) from an EpochSampler: then the sample's random transforms are seeded
        by (seed, epoch, index), the same in any DataLoader worker, on any rank and after a resume."""
        generator = None
        if isinstance(key, tuple):
            epoch, key = key
            generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + key) % 2**63)
        if self.cache is not None:
            image, mask = self.cache[key]
            return transform_pair(image, torch.from_numpy(mask), self.transform, generator)
        image_path, mask_path = self.pairs[key]
        mask, unknown = self.class_map.apply(read_mask(mask_path))
        if unknown and not self.reported_unknown:
            # once per dataset (and DataLoader worker), not per pixel: `--stats` gives the exact count
            self.reported_unknown = True
            print(
                f"warning: {unknown} pixels of {mask_path} have mask values outside the class map; "
                "they are ignored (255). `python dataset.py --stats` counts them over the split.",
                file=sys.stderr,
            )
        return transform_pair(read_image(image_path), torch.from_numpy(mask), self.transform, generator)


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
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "deeplab_demo" / f"v{DEMO_VERSION}-seed{seed}"


def build_dataset(
    data: Path | None,
    layout: str,
    split: str,
    transform: TransformConfig,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    seed: int = 0,
    cache: bool = False,
) -> SegmentationDataset:
    """The dataset of one split. With no data folder (or layout 'demo') the demo data is generated first."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown --layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if data is None or layout == "demo":
        data = make_demo(data if data is not None else default_demo_root(seed), seed=seed)
        layout = "offroad"
    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"--data folder {data} does not exist")
    if layout == "auto":
        layout = detect_layout(data, split)
    if layout == "offroad":
        class_map = offroad_class_map()
    elif layout == "cityscapes":
        class_map = cityscapes_class_map()
    else:
        if num_classes is None:
            raise DatasetError("--layout folder needs --num-classes")
        class_map = folder_class_map(num_classes, class_names)
    if num_classes is not None and num_classes != class_map.num_classes:
        raise DatasetError(
            f"--num-classes {num_classes} does not match layout {layout} ({class_map.num_classes} classes)"
        )
    pairs = list_pairs(data, layout, split)
    if not pairs:
        raise DatasetError(f"split {split!r} of {data} holds no images")
    return SegmentationDataset(pairs, class_map, transform, cache, seed)


def class_pixel_counts(dataset: SegmentationDataset) -> tuple[np.ndarray, int, int]:
    """Exact pixel counts per class over the split's full-size masks, the ignored pixel count, and how many
    of those had values outside the class map."""
    counts = np.zeros(dataset.class_map.num_classes + 1, dtype=np.int64)
    unknown_total = 0
    for _, mask_path in dataset.pairs:
        mask, unknown = dataset.class_map.apply(read_mask(mask_path))
        mask = np.where(mask == IGNORE_INDEX, dataset.class_map.num_classes, mask)
        counts += np.bincount(mask.ravel(), minlength=len(counts))
        unknown_total += unknown
    return counts[:-1], int(counts[-1]), unknown_total


CLASS_WEIGHT_RULE = "median frequency balancing, median(freq) / freq, clipped to [0.1, 10]; absent classes 0"


def class_weights(counts: np.ndarray, clip: tuple[float, float] = (0.1, 10.0)) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus 2015): w_c = median(f) / f_c over the classes present,
    clipped to `clip` so a rare class cannot dominate the loss; absent classes get weight 0."""
    freq = counts / max(counts.sum(), 1)
    present = counts > 0
    weights = np.zeros(len(counts))
    if present.any():
        weights[present] = np.clip(np.median(freq[present]) / freq[present], *clip)
    return weights


def print_stats(dataset: SegmentationDataset) -> None:
    counts, ignored, unknown = class_pixel_counts(dataset)
    weights = class_weights(counts)
    total = max(int(counts.sum()), 1)
    print(f"{'index':>5}  {'class':<20} {'pixels':>14} {'frequency':>10} {'weight':>8}")
    for i, name in enumerate(dataset.class_map.names):
        print(f"{i:>5}  {name:<20} {counts[i]:>14d} {counts[i] / total:>10.6f} {weights[i]:>8.4f}")
    print(f"ignored pixels: {ignored} ({unknown} with values outside the class map)")
    print(f"weights: {CLASS_WEIGHT_RULE}")


def reference_pipeline(cfg: TransformConfig) -> Callable[[Path, Path], tuple[torch.Tensor, torch.Tensor]]:
    """The baseline of `--benchmark`: torchvision's reference segmentation recipe on v2 transforms (PIL decode,
    RandomResize of the shorter side, RandomCrop padding masks with 255, flip, ToDtype, Normalize)."""
    from torchvision import tv_tensors

    steps = []
    if cfg.size is not None:
        steps.append(T.Resize(list(cfg.size)))
    if cfg.scale is not None:
        base = min(cfg.size) if cfg.size else None
        steps.append(("scale", cfg.scale, base))
    if cfg.crop is not None:
        steps.append(T.RandomCrop(list(cfg.crop), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}))
    steps.append(T.RandomHorizontalFlip(0.5))
    if cfg.augment:
        steps.append(T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02))
    tail = T.Compose([T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip

    def load(image_path: Path, mask_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(image_path) as im, Image.open(mask_path) as m:
            image = tv_tensors.Image(TF.pil_to_tensor(im.convert("RGB")))
            mask = tv_tensors.Mask(TF.pil_to_tensor(m))
        for step in steps:
            if isinstance(step, tuple):  # RandomResize of the shorter side, from scale x the (resized) base size
                _, (lo, hi), base = step
                short = base or min(image.shape[-2:])
                image, mask = T.RandomResize(int(lo * short), int(hi * short))(image, mask)
            else:
                image, mask = step(image, mask)
        return tail(image, mask)

    return load


def benchmark_pipeline(dataset: SegmentationDataset, samples: int) -> tuple[float, float]:
    """Training samples/s of this repository's per-sample pipeline (read, decode, map ids, scale, crop, flip,
    jitter, normalise) and of the reference pipeline on the same files, both in this one process."""
    pairs = [dataset.pairs[i % len(dataset)] for i in range(samples)]
    reference = reference_pipeline(dataset.transform)
    torch.manual_seed(0)
    normalize(dataset[0][0]), reference(*pairs[0])  # untimed warm-up of both, so neither pays first-call costs
    start = time.perf_counter()
    for i in range(samples):
        image, _ = dataset[i % len(dataset)]
        normalize(image)
    ours = samples / (time.perf_counter() - start)
    start = time.perf_counter()
    for image_path, mask_path in pairs:
        reference(image_path, mask_path)
    return ours, samples / (time.perf_counter() - start)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage block) with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def one_line(error: Exception) -> str:
    """The message of an error as one line. An error raised in a DataLoader worker reaches the main process
    wrapped with the worker's traceback; its own message is the last line there."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1].split(": ", 1)[1] if "Traceback" in str(error) and ": " in lines[-1] else lines[-1]


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Flags that pick a dataset, shared by every script."""
    parser.add_argument("--data", type=Path, default=None, help="dataset root (default: the generated demo data)")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout (default: detect)")
    parser.add_argument("--num-classes", type=int, default=None, help="number of classes (folder layout)")
    parser.add_argument(
        "--class-names", type=lambda s: [n.strip() for n in s.split(",")], default=None, help="comma-separated names"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (also picks the demo data)")
    parser.add_argument(
        "--cache", action="store_true", help="decode each split once into uint8 files under ~/.cache/deeplab_decoded"
    )


def add_transform_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the training transforms, shared by train_deeplab.py and `dataset.py --benchmark`."""
    parser.add_argument(
        "--size", type=int, nargs="+", default=None, metavar="H W", help="resize to H W (default: keep)"
    )
    parser.add_argument(
        "--crop", type=int, nargs="+", default=None, metavar="H W", help="random crop (one value: square)"
    )
    parser.add_argument("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="random scale range")
    parser.add_argument("--augment", action="store_true", help="colour jitter")


def transform_from_args(args: argparse.Namespace, train: bool) -> TransformConfig:
    """The TransformConfig that add_transform_args's flags describe (train=False: the resize alone)."""
    scale = tuple(args.scale) if args.scale else None
    return TransformConfig(hw_pair(args.size), scale, hw_pair(args.crop, "--crop"), augment=args.augment, train=train)


def hw_pair(values: list[int] | None, flag: str = "--size") -> tuple[int, int] | None:
    """`--crop 512` means 512x512; `--crop 512 1024` is H x W."""
    if values is None:
        return None
    if len(values) > 2 or min(values) <= 0:
        raise DatasetError(f"{flag} takes one or two positive sizes (H W), got {' '.join(map(str, values))}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def main(args: argparse.Namespace) -> None:
    try:
        cfg = transform_from_args(args, train=args.benchmark is not None)  # the benchmark times training transforms
        dataset = build_dataset(
            args.data, args.layout, args.split, cfg, args.num_classes, args.class_names, args.seed, args.cache
        )
        print(f"{len(dataset)} images in split {args.split!r}, {dataset.class_map.num_classes} classes")
        if args.stats:
            print_stats(dataset)
        if args.benchmark:
            ours, reference = benchmark_pipeline(dataset, args.benchmark)
            print(f"pipeline: {ours:.2f} samples/s")
            print(f"baseline: {reference:.2f} samples/s")
            print(f"ratio: {ours / reference:.2f}")
    except DatasetError as e:
        sys.exit(f"error: {e}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Inspect a segmentation dataset", add_help=add_help)
    add_data_args(parser)
    parser.add_argument("--split", default="train", help="split to read (train, val, ...)")
    parser.add_argument("--stats", action="store_true", help="print per-class pixel counts and suggested weights")
    parser.add_argument("--benchmark", type=int, default=None, metavar="N", help="time N training samples")
    add_transform_args(parser)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
