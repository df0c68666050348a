"""Metrics (ConfusionMatrix), the validation loop, and evaluation of a saved checkpoint.

python evaluate.py --checkpoint runs/x/best.pth [--data ROOT] [--split val]
"""

import argparse
import contextlib
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
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


def read_run(run_dir: Path) -> dict:
    """A run folder's log.csv as columns of floats (NaN where a cell is empty), plus run.json when present."""
    log = run_dir / "log.csv"
    try:
        with open(log, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DatasetError(f"cannot read {log}: {e.strerror}") from None
    if not rows:
        raise DatasetError(f"{log} holds no epochs")
    columns = {name: np.array([float(r[name]) if r.get(name) else math.nan for r in rows]) for name in rows[0]}
    meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    return {"name": run_dir.name, "columns": columns, "meta": meta}


def class_names_of(runs: list[dict]) -> list[str]:
    """Names from the first run.json that has them, else class_<c> for the first run's class columns."""
    for run in runs:
        if run["meta"].get("class_names"):
            return run["meta"]["class_names"]
    n = sum(1 for c in runs[0]["columns"] if c.startswith("class_") and c.endswith("_val"))
    return [f"class_{c}" for c in range(n)]


def best_epoch_row(run: dict) -> int | None:
    miou = run["columns"].get("val_mIoU")
    return None if miou is None or np.isnan(miou).all() else int(np.nanargmax(miou))


def _value(run: dict, column: str, row: int | None) -> float:
    """One cell of a run's log, NaN where the column or the row is missing."""
    values = run["columns"].get(column)
    return math.nan if values is None or row is None else float(values[row])


def summary_markdown(runs: list[dict]) -> str:
    """One row per run: best val mIoU and its epoch, final mIoUs, pixel acc and per-class val IoU at the best
    epoch, run time and trainable parameters."""
    names = class_names_of(runs)
    header = ["run", "best val mIoU", "best epoch", "final train mIoU", "final val mIoU", "pixel acc"]
    header += ["total time (s)", "mean epoch time (s)", "trainable params", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        best = best_epoch_row(run)
        runtime = run["columns"].get("Runtime", np.array([math.nan]))
        cells = [
            run["name"],
            f"{_value(run, 'val_mIoU', best):.4f}",
            f"{_value(run, 'epoch', best):.0f}",
            f"{_value(run, 'train_mIoU', -1):.4f}",
            f"{_value(run, 'val_mIoU', -1):.4f}",
            f"{_value(run, 'pixel_acc', best):.4f}",
            f"{runtime.sum():.1f}",
            f"{runtime.mean():.1f}",
            str(run["meta"].get("trainable_params", "n/a")),
            *(f"{_value(run, f'class_{c}_val', best):.4f}" for c in range(len(names))),
        ]
        lines.append("| " + " | ".join(cells).replace("nan", "n/a") + " |")
    return "\n".join(lines) + "\n"


def _curves(ax, runs: list[dict], column: str, title: str, ylabel: str) -> None:
    """Every run's `column` against its epochs; runs lacking the column are named in the title."""
    missing = [run["name"] for run in runs if column not in run["columns"]]
    for run in runs:
        if column in run["columns"]:
            ax.plot(run["columns"]["epoch"], run["columns"][column], marker=".", label=run["name"])
    if len(missing) == len(runs):
        ax.text(0.5, 0.5, f"no run has a {column} column", ha="center", va="center", transform=ax.transAxes)
    elif missing:
        title += f" (no {column} in: {', '.join(missing)})"
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=8)
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.grid(True, linestyle="--", alpha=0.5)


def _save(fig: Figure, path: Path) -> None:
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare_runs(run_dirs: list[Path], report: Path) -> list[Path]:
    """Write summary.md and the comparison plots of several runs into `report`; return the files written."""
    runs = [read_run(Path(d)) for d in run_dirs]
    report.mkdir(parents=True, exist_ok=True)
    written = [report / "summary.md"]
    written[0].write_text(summary_markdown(runs))

    def figure(name: str, rows: int = 1, cols: int = 1, size: tuple[float, float] = (8, 5)):
        fig = Figure(figsize=size)
        written.append(report / name)
        return fig, fig.subplots(rows, cols, squeeze=False)

    fig, ax = figure("lr_schedule.png")
    _curves(ax[0, 0], runs, "lr", "Learning rate at the start of each epoch", "lr")
    _save(fig, written[-1])

    cols = min(len(runs), 3)
    fig, axes = figure(
        "loss_per_run.png", math.ceil(len(runs) / cols), cols, (5 * cols, 3.5 * math.ceil(len(runs) / cols))
    )
    for ax, run in zip(axes.flat, runs):
        for column in ("train_loss", "val_loss"):
            if column in run["columns"]:
                ax.plot(run["columns"]["epoch"], run["columns"][column], marker=".", label=column)
        ax.set(title=run["name"], xlabel="epoch", ylabel="loss")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    _save(fig, written[-1])

    for name, pair, ylabel in (
        ("loss_all.png", ("train_loss", "val_loss"), "loss"),
        ("miou.png", ("train_mIoU", "val_mIoU"), "mIoU"),
    ):
        fig, axes = figure(name, 1, 2, (14, 5))
        for ax, column in zip(axes.flat, pair):
            _curves(ax, runs, column, column, ylabel)
        _save(fig, written[-1])

    fig, ax = figure("per_class_iou.png", size=(max(8, 1.2 * len(class_names_of(runs))), 5))
    ax = ax[0, 0]
    names = class_names_of(runs)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [_value(run, f"class_{c}_val", best_epoch_row(run)) for c in range(len(names))]
        ax.bar(np.arange(len(names)) + i * width, values, width, label=run["name"])
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    ax.set(title="Per-class val IoU at each run's best epoch", ylabel="IoU")
    ax.legend(fontsize=8)
    _save(fig, written[-1])

    totals = [run["columns"].get("Runtime", np.array([math.nan])) for run in runs]
    labels = [run["name"] for run in runs]
    fig, axes = figure("time.png", 1, 2, (14, 5))
    axes[0, 0].bar(labels, [t.sum() for t in totals], color="tab:blue")
    axes[0, 0].set(title="Total training + validation time", ylabel="seconds")
    axes[0, 1].bar(labels, [t.mean() for t in totals], color="tab:red")
    axes[0, 1].set(title="Mean time per epoch", ylabel="seconds")
    for ax in axes.flat:
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        if any(np.isnan(t).all() for t in totals):
            ax.set_title(ax.get_title() + " (runs without Runtime show no bar)")
    _save(fig, written[-1])

    fig, ax = figure("tradeoff.png")
    ax = ax[0, 0]
    for run, total in zip(runs, totals):
        point = (total.sum(), _value(run, "val_mIoU", best_epoch_row(run)))
        ax.scatter(*point, s=60)
        ax.annotate(run["name"], point, fontsize=8)
    ax.set(title="Time vs best val mIoU", xlabel="total time (s)", ylabel="best val mIoU")
    ax.grid(True, linestyle="--", alpha=0.5)
    _save(fig, written[-1])
    return written


def main(args: argparse.Namespace) -> None:
    if args.compare:
        try:
            files = compare_runs(args.compare, args.report)
        except DatasetError as e:
            sys.exit(f"error: {e}")
        print(f"wrote {len(files)} files to {args.report}: {', '.join(f.name for f in files)}")
        return
    if args.checkpoint is None:
        sys.exit("error: give --checkpoint to evaluate a model, or --compare RUN... --report DIR to compare runs")
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
    parser.add_argument("--checkpoint", type=Path, default=None, help="best.pth or last.pth of a run")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RUN", help="run folders to compare")
    parser.add_argument("--report", type=Path, default=Path("report"), help="output folder of --compare")
    add_data_args(parser)
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="resize to H W (default: as trained)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
