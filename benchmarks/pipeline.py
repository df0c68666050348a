"""The data pipeline against torchvision's reference segmentation recipe, and PNG decoding by libspng against
Pillow (BENCHMARKS.md, "Data pipeline").

    python benchmarks/pipeline.py [--camvid ../shared/data/camvid] [--samples 48]

Cityscapes-size inputs: the first 16 CamVid training frames upscaled to 2048x1024 (bilinear images, nearest masks)
into a `folder` tree under --work, trained as the DeepLab Cityscapes recipes train: random scale 0.5-2.0, a 512x1024
crop, a horizontal flip. Both pipelines end in a normalised float tensor and take turns, one sample each.
"""

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from common import CAMVID, ROOT, in_turns, machine
from PIL import Image

import dataset
from dataset import IMAGENET_MEAN, IMAGENET_STD, ClassOptions, TransformConfig, build_dataset, normalize

BIG = (1024, 2048)  # H, W of the upscaled frames


def reference_pipeline(cfg: TransformConfig) -> Callable[[Path, Path], tuple[torch.Tensor, torch.Tensor]]:
    """torchvision's reference segmentation recipe on v2 transforms: PIL decode, RandomResize of the shorter side,
    RandomCrop padding masks with 255, flip, colour jitter with --augment, ToDtype, Normalize."""
    from torchvision import tv_tensors

    scale = T.RandomResize(int(cfg.scale[0] * min(BIG)), int(cfg.scale[1] * min(BIG)))
    steps = [scale, T.RandomCrop(list(cfg.crop), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
             T.RandomHorizontalFlip(0.5)]
    steps += [T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02)] if cfg.augment else []
    steps += [T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
              T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    pipeline = T.Compose(steps)

    def load(image_path: Path, mask_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(image_path) as im, Image.open(mask_path) as m:
            image, mask = tv_tensors.Image(TF.pil_to_tensor(im.convert("RGB"))), tv_tensors.Mask(TF.pil_to_tensor(m))
        return pipeline(image, mask)

    return load


def big_frames(camvid: Path, work: Path, n: int = 16) -> Path:
    """The first n CamVid training frames at 2048x1024, in the folder layout (made once)."""
    for kind, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
        (work / "train" / kind).mkdir(parents=True, exist_ok=True)
        for path in sorted((camvid / "train" / kind).iterdir())[:n]:
            if not (work / "train" / kind / path.name).exists():
                Image.open(path).resize(BIG[::-1], resample).save(work / "train" / kind / path.name)
    return work


def pipeline_row(data: Path, classes: ClassOptions, samples: int, augment: bool, cache: bool) -> tuple[float, float]:
    """Samples/s of this repository's pipeline (read, decode, map ids, scale, crop, flip, jitter, normalise) and of
    the reference on the same files, in turns."""
    cfg = TransformConfig(scale=(0.5, 2.0), crop=(512, 1024), augment=augment, train=True)
    ours = build_dataset(data, "folder", "train", cfg, classes, cache=cache)
    reference, at = reference_pipeline(cfg), {"ours": 0, "reference": 0}

    def step(which: str) -> None:
        i = at[which] % len(ours)
        normalize(ours[i][0]) if which == "ours" else reference(*ours.pairs[i])
        at[which] += 1

    torch.manual_seed(0)
    seconds = in_turns({"ours": lambda: step("ours"), "reference": lambda: step("reference")}, samples)
    return 1 / seconds["ours"], 1 / seconds["reference"]


def decode_row(path: Path, rounds: int) -> tuple[float, float]:
    """Milliseconds to decode one PNG: Pillow, and libspng through pyspng (the same pixels), in turns."""
    data = path.read_bytes()
    fmt = "L" if Image.open(io.BytesIO(data)).mode == "L" else "RGB"

    def pillow() -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im if fmt == "L" else im.convert("RGB"))

    assert np.array_equal(pillow(), dataset.pyspng.load(data, fmt))
    seconds = in_turns({"pillow": pillow, "pyspng": lambda: dataset.pyspng.load(data, fmt)}, rounds)
    return 1000 * seconds["pillow"], 1000 * seconds["pyspng"]


def main(args: argparse.Namespace) -> None:
    data, classes = big_frames(args.camvid, args.work), ClassOptions(table=args.camvid / "classes.csv")  # 11 ignored
    torch.set_num_threads(1)  # one DataLoader worker's view: a sample at a time, one thread
    print(f"one process, one thread, {args.samples} samples of 2048x1024 CamVid frames each; {machine()}")
    print("| pipeline | samples/s | reference samples/s | ratio |\n|---|---|---|---|")
    rows = {"PNGs decoded by libspng (pyspng), the default": (False, False),
            "the same with --augment (colour jitter)": (True, False),
            "--cache (decoded once into uint8 memory-mapped files)": (False, True)}
    for name, (augment, cache) in rows.items():
        ours, reference = pipeline_row(data, classes, args.samples, augment, cache)
        print(f"| {name} | {ours:.2f} | {reference:.2f} | {ours / reference:.2f} |")
    spng, dataset.pyspng = dataset.pyspng, None  # as where pyspng is not installed: Pillow decodes everything
    ours, reference = pipeline_row(data, classes, args.samples, False, False)
    print(f"| PNGs decoded by Pillow (no pyspng) | {ours:.2f} | {reference:.2f} | {ours / reference:.2f} |")
    dataset.pyspng = spng
    print("\n| file (one decode, median of 20 in turns) | Pillow ms | pyspng ms |\n|---|---|---|")
    first = sorted((args.camvid / "train" / "images").iterdir())[0].name
    for name, path in (("CamVid 480x360 RGB", args.camvid / "train" / "images" / first),
                       ("CamVid 480x360 8-bit mask", args.camvid / "train" / "masks" / first),
                       ("2048x1024 RGB", data / "train" / "images" / first),
                       ("2048x1024 8-bit mask", data / "train" / "masks" / first)):
        pillow, spng_ms = decode_row(path, 20)
        print(f"| {name} | {pillow:.1f} | {spng_ms:.1f} |")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", type=Path, default=CAMVID)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "pipeline-benchmark", help="the 2048x1024 frames")
    parser.add_argument("--samples", type=int, default=48)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
