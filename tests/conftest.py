from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
