import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
from dataset import make_demo

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def write_pair(image_path: Path, mask_path: Path, mask: np.ndarray, seed: int = 0) -> None:
    """An RGB image of random pixels and the given mask (16-bit PNG when the values need it)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(image_path)
    Image.fromarray(mask.astype(np.uint16 if mask.max() > 255 else np.uint8)).save(mask_path)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small demo dataset (offroad layout) shared by the end-to-end tests."""
    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, splits={"train": 8, "val": 4}, size=(64, 96))


def write_folder(root: Path, split: str, masks: list[np.ndarray], suffix: str = ".png", first: int = 0) -> Path:
    """A `folder` layout split: random RGB images and the given masks (ids [H, W] or colours [H, W, 3]), saved
    as `suffix` (.jpg masks are lossy, quality 90)."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks, first):
        rgb = np.random.default_rng([i, *split.encode()]).integers(0, 256, (*mask.shape[:2], 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / split / "images" / f"{i}.png")
        image = Image.fromarray(mask.astype(np.uint16 if mask.max() > 255 else np.uint8))
        image.save(root / split / "masks" / f"{i}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    return root


def run_cli(args: list[str]) -> str:
    """`python dataset.py ARGS` that must fail: its one-line message."""
    with pytest.raises(SystemExit) as e:
        dataset.main(dataset.get_args_parser().parse_args(args))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def check(args: list[str], capsys) -> tuple[int, list[str]]:
    """`python dataset.py --check ARGS`: its exit status and its lines."""
    with pytest.raises(SystemExit) as e:
        dataset.main(dataset.get_args_parser().parse_args(["--check", *args]))
    return e.value.code, capsys.readouterr().out.splitlines()


def random_masks(values: list[int], n: int, shape: tuple[int, int] = (12, 16), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(values, shape).astype(np.uint8) for _ in range(n)]


def counts_of(masks: list[np.ndarray], values: list[int]) -> list[int]:
    """Pixels of each value, by hand: the independent count every layout must read back."""
    return [int(sum((m == v).sum() for m in masks)) for v in values]


def save_rgb(path: Path, shape: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height RGB pixels, followed by almost no data: a decompression bomb's
    shape (a real 20000 x 20000 one is 1.2 MB), which nothing may decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
