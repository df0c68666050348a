"""Metrics (ConfusionMatrix), the validation loop, and evaluation of a saved checkpoint.

python evaluate.py --checkpoint runs/x/best.pth [--data ROOT] [--split val]
"""

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import IGNORE_INDEX, DatasetError, TransformConfig, add_data_args, build_dataset, collate, hw_pair
from losses import LossSpecError, build_loss
from models import ModelError, build_model, load_checkpoint


class ConfusionMatrix:
    """Counts of (true class, predicted class) pixel pairs; rows are the truth. Pixels whose target is
    ignore_index (or outside 0..num_classes-1) are not counted."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of the same shape, on any device (the matrix stays on theirs)."""
        n = self.num_classes
        pred, target = pred.flatten().long(), target.flatten().long()
        counted = (target >= 0) & (target < n) & (target != self.ignore_index)
        # uncounted pixels go to an extra bin instead of being dropped, which would need a host sync
        bins = torch.where(counted, target * n + pred, n * n)
        counts = torch.bincount(bins, minlength=n * n + 1)[: n * n].reshape(n, n)
        self.mat = counts if self.mat is None else self.mat + counts

    def compute(self) -> dict:
        """miou: mean IoU over classes whose union is non-zero; iou: per class (NaN where the union is zero);
        pixel_acc: correct / counted pixels."""
        h = self.mat.double().cpu() if self.mat is not None else torch.zeros(self.num_classes, self.num_classes)
        diag = h.diag()
        union = h.sum(0) + h.sum(1) - diag
        iou = torch.where(union > 0, diag / union.clamp_min(1), torch.full_like(diag, math.nan))
        seen = ~iou.isnan()
        return {
            "miou": float(iou[seen].mean()) if seen.any() else math.nan,
            "iou": iou.tolist(),
            "pixel_acc": float(diag.sum() / h.sum()) if h.sum() > 0 else math.nan,
        }


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    device: torch.device,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Mean loss per image and the ConfusionMatrix metrics over the loader."""
    model.eval()
    cm = ConfusionMatrix(num_classes)
    loss_sum, images = torch.zeros((), device=device), 0
    channels_last = device.type == "cuda"
    for image, target in tqdm(loader, desc="val", leave=False, dynamic_ncols=True, disable=None):
        image = image.to(device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(image)
        loss_sum += criterion(logits, target).detach() * image.shape[0]
        images += image.shape[0]
        cm.update(logits.argmax(1), target)
    return {"loss": float(loss_sum) / max(images, 1), **cm.compute()}


def format_iou(names: list[str], iou: list[float]) -> str:
    return " | ".join(f"{name} {'n/a' if math.isnan(v) else f'{v:.4f}'}" for name, v in zip(names, iou))


def main(args: argparse.Namespace) -> None:
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        run = checkpoint["args"]
        model = build_model(run["arch"], checkpoint["num_classes"])
        model.load_state_dict(checkpoint["model"])
        size = hw_pair(args.size) if args.size else hw_pair(run.get("size"))
        data = args.data if args.data is not None else (Path(run["data"]) if run.get("data") else None)
        layout = args.layout if args.data is not None else run.get("layout", "auto")
        dataset = build_dataset(
            data,
            layout,
            args.split,
            TransformConfig(size=size, train=False),
            checkpoint["num_classes"],
            checkpoint["class_names"],
            run.get("seed", 0),
        )
        criterion = build_loss(run.get("loss", "ce"), checkpoint["num_classes"])
    except (DatasetError, ModelError, LossSpecError) as e:
        sys.exit(f"error: {e}")
    device = torch.device(args.device)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
    metrics = evaluate(model.to(device), loader, criterion.to(device), device, checkpoint["num_classes"])
    print(f"{args.checkpoint} on {args.split} ({len(dataset)} images)")
    print(f"val loss {metrics['loss']:.4f} | val mIoU {metrics['miou']:.4f} | pixel acc {metrics['pixel_acc']:.4f}")
    for name, v in zip(checkpoint["class_names"], metrics["iou"]):
        print(f"  {name:<20} {'n/a' if math.isnan(v) else f'{v:.4f}'}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a DeepLab checkpoint", add_help=add_help)
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pth or last.pth of a run")
    add_data_args(parser)
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="resize to H W (default: as trained)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
