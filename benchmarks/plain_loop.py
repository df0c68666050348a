"""The recipe against a plain training loop in the style of torchvision's references/segmentation, on CamVid from
scratch (README "Results on real data", BENCHMARKS.md "CamVid from scratch" and "CamVid at full resolution").

    python benchmarks/plain_loop.py                          # seeds 0 1 2 at 180x240: 83 minutes on 2 cores
    python benchmarks/plain_loop.py --seeds 0 1 --size 360 480 --crop 240 320 --plain-epochs 17 \
        --recipe-flags --epochs 22 --low-res-epochs 10       # full resolution, about the same wall time each

For each seed, one run at a time: the plain loop (torchvision's model untouched, PIL decoding, v2 transforms, SGD lr
0.02, momentum 0.9, weight decay 1e-4, poly 0.9 per iteration, cross-entropy ignoring 255; resize to --size, random
scale 0.5-2.0 of it, a crop of --crop, a flip; batch 8), then README's command with the same size, crop and batch.
Both final models (the last epoch, no selection on val) are scored on CamVid's val at --size by `evaluate.py
--compare-checkpoint`: the paired bootstrap over the images, which measures the images' noise; the spread over seeds
is the seeds'.
"""

import argparse
import shutil
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from common import CAMVID, ROOT, compared, machine, recipe, t_interval
from PIL import Image
from torchvision import tv_tensors
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist"]


# ---- the plain loop, as a torchvision reference user writes it ----------------------------------------------------


class CamVid(torch.utils.data.Dataset):
    def __init__(self, root: Path, split: str, transform: T.Transform):
        self.images, self.transform = sorted((root / split / "images").glob("*.png")), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(T.functional.pil_to_tensor(Image.open(self.images[i]).convert("RGB")))
        mask = tv_tensors.Mask(T.functional.pil_to_tensor(Image.open(self.images[i].parents[1] / "masks" /
                                                                     self.images[i].name)))
        image, mask = self.transform(image, mask)
        return image, torch.where(mask[0] >= 11, 255, mask[0])  # 11 = unlabelled


def plain_loop(root: Path, out: Path, epochs: int, seed: int, size: tuple[int, int], crop: tuple[int, int]) -> float:
    """Train, print each epoch's val mIoU, save a checkpoint that evaluate.py loads; the wall time (also saved in
    the checkpoint, as "seconds")."""
    torch.manual_seed(seed)
    to_float = T.Compose([T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                          T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    train_tf = T.Compose([T.Resize(list(size)), T.RandomResize(min(size) // 2, min(size) * 2),
                          T.RandomHorizontalFlip(), T.RandomCrop(list(crop), pad_if_needed=True,
                                                                 fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
                          to_float])
    train = torch.utils.data.DataLoader(CamVid(root, "train", train_tf), 8, shuffle=True, num_workers=2,
                                        drop_last=True)
    val = torch.utils.data.DataLoader(CamVid(root, "val", T.Compose([T.Resize(list(size)), to_float])), 8,
                                      num_workers=2)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    total = epochs * len(train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / total) ** 0.9)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        for image, target in train:
            loss = torch.nn.functional.cross_entropy(model(image)["out"], target, ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        confusion = torch.zeros(11, 11, dtype=torch.int64)
        with torch.no_grad():
            for image, target in val:
                pred, keep = model(image)["out"].argmax(1), target != 255
                confusion += torch.bincount(target[keep] * 11 + pred[keep], minlength=121).reshape(11, 11)
        iou = confusion.diag() / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).clamp_min(1)
        print(f"plain loop, epoch {epoch + 1} | loss {loss.item():.4f} | val mIoU {iou.mean():.4f} | "
              f"{time.time() - start:.0f} s", flush=True)
    seconds = time.time() - start
    args = {"arch": "deeplabv3_mobilenet_v3_large", "size": list(size), "data": str(root), "layout": "folder"}
    out.parent.mkdir(parents=True, exist_ok=True)
    # torchvision's keys are this repository's, so evaluate.py loads it; "seconds", so that a later comparison that
    # reuses the run reports its wall too
    torch.save({"model": model.state_dict(), "args": args, "num_classes": 11, "class_names": NAMES,
                "epoch": epochs, "seconds": seconds}, out)
    return seconds


# ---- the two side by side: README's command (benchmarks/common.py) against the plain loop, seed by seed ---------


def main(args: argparse.Namespace) -> None:
    size, crop, rows = tuple(args.size), tuple(args.crop or args.size), []
    for seed in args.seeds:
        work = args.work / f"{size[0]}x{size[1]}-seed{seed}"
        shutil.rmtree(work, ignore_errors=True)  # this script's own runs of before
        plain_s = plain_loop(args.camvid, work / "plain.pth", args.plain_epochs, seed, size, crop)
        ours_s = recipe(args.camvid, work / "recipe", seed, size, crop, args.recipe_flags)
        rows.append((seed, plain_s, ours_s, compared(work / "plain.pth", work / "recipe" / "last.pth",
                                                      work / "compared.json")))
    print(f"\nCamVid val, final models at {size[0]}x{size[1]} (crops of {crop[0]}x{crop[1]}); plain loop "
          f"{args.plain_epochs} epochs, the recipe {' '.join(args.recipe_flags) or 'as README runs it'}; {machine()}")
    print("| seed | plain loop: mIoU, wall | the recipe: mIoU, wall | recipe - plain, 95% CI |\n|---|---|---|---|")
    for seed, plain_s, ours_s, r in rows:
        print(f"| {seed} | {r['a']:.4f}, {plain_s:.0f} s | {r['b']:.4f}, {ours_s:.0f} s | {r['diff']:+.3f} "
              f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    diffs = [r["diff"] for *_, r in rows]
    if len(diffs) > 1:
        mean, half = t_interval(diffs)
        print(f"mean difference {mean:+.3f}, over the seeds 95% t interval [{mean - half:+.3f}, {mean + half:+.3f}]")
    print("\n| class | plain loop: IoU over the seeds | the recipe |\n|---|---|---|")
    for c, name in enumerate(NAMES):
        plain, ours = ([r[key][c] for *_, r in rows] for key in ("iou_a", "iou_b"))
        print(f"| {name} | {min(plain):.2f}-{max(plain):.2f} | {min(ours):.2f}-{max(ours):.2f} |")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", type=Path, default=CAMVID)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "plain-loop-benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, nargs=2, default=[180, 240], metavar=("H", "W"))
    parser.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="the training crop of both (default: --size)")
    parser.add_argument("--plain-epochs", type=int, default=20)
    parser.add_argument("--recipe-flags", nargs=argparse.REMAINDER, default=[],
                        help="more flags for train_deeplab.py (last on the line)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
