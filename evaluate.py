"""Metrics (ConfusionMatrix), the validation loop, and evaluation of a saved checkpoint.

python evaluate.py --checkpoint runs/x/best.pth [--data ROOT] [--split val]
"""

import argparse
import contextlib
import csv
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import (
    IGNORE_INDEX,
    ArgumentParser,
    ClassMap,
    DatasetError,
    TransformConfig,
    add_data_args,
    build_dataset,
    cityscapes_table,
    collate,
    hw_pair,
    normalize,
    numbered_table,
    offroad_table,
    one_line,
    read_image,
    transform_pair,
)
from models import (
    ARCHS,
    ModelError,
    aux_params,
    build_model,
    count_macs,
    count_params,
    load_checkpoint,
    memory_format_of,
    model_from_checkpoint,
    place,
)


def per_image_confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Confusion matrices [B, C, C] (rows: truth) of a batch of predictions and targets [B, ...]. Pixels whose
    target is ignore_index (or outside 0..C-1) are not counted. On the tensors' device, with no host sync:
    uncounted pixels go to an extra bin instead of being dropped."""
    n, b = num_classes, target.shape[0]
    pred, target = pred.reshape(b, -1).long(), target.reshape(b, -1).long()
    counted = (target >= 0) & (target < n) & (target != ignore_index)
    offset = torch.arange(b, device=target.device)[:, None] * (n * n)
    bins = torch.where(counted, offset + target * n + pred, b * n * n)
    return torch.bincount(bins.flatten(), minlength=b * n * n + 1)[: b * n * n].reshape(b, n, n)


def iou_from_confusion(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU [..., C] (NaN where a class's union is zero) and mIoU [...] (mean over the other classes)
    of confusion matrices [..., C, C]."""
    mat = mat.double()
    diag = mat.diagonal(dim1=-2, dim2=-1)
    union = mat.sum(-1) + mat.sum(-2) - diag
    iou = torch.where(union > 0, diag / union.clamp_min(1), torch.full_like(diag, math.nan))
    return iou, iou.nanmean(dim=-1)


class ConfusionMatrix:
    """Counts of (true class, predicted class) pixel pairs; rows are the truth. Pixels whose target is
    ignore_index (or outside 0..num_classes-1) are not counted."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of the same shape, on any device (the matrix moves to theirs)."""
        counts = per_image_confusion(pred.reshape(1, -1), target.reshape(1, -1), self.num_classes, self.ignore_index)
        self.mat = self.mat.to(counts.device) + counts[0]

    def compute(self) -> dict:
        """miou: mean IoU over classes whose union is non-zero; iou: per class (NaN where the union is zero);
        pixel_acc: correct / counted pixels."""
        return metrics_from_confusion(self.mat)


def metrics_from_confusion(mat: torch.Tensor) -> dict:
    """mIoU, per-class IoU, pixel accuracy, and per class: precision, recall and share of the counted pixels."""
    mat = mat.double().cpu()
    iou, miou = iou_from_confusion(mat)
    diag, truth, predicted, total = mat.diagonal(), mat.sum(1), mat.sum(0), mat.sum()
    nan = torch.full_like(diag, math.nan)
    return {
        "miou": float(miou),
        "iou": iou.tolist(),
        "pixel_acc": float(diag.sum() / total) if total > 0 else math.nan,
        "precision": torch.where(predicted > 0, diag / predicted.clamp_min(1), nan).tolist(),
        "recall": torch.where(truth > 0, diag / truth.clamp_min(1), nan).tolist(),
        "share": (truth / total.clamp_min(1)).tolist(),
    }


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision runs on CUDA only; bf16 falls back to fp16 on GPUs without it."""
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def sliding_window(model: nn.Module, image: torch.Tensor, window: tuple[int, int], stride: int) -> torch.Tensor:
    """Logits of windows of `window` (H, W) taken every `stride` pixels (the last one flush with the border),
    averaged where they overlap. Images smaller than a window are padded for it."""
    h, w = image.shape[-2:]
    wh, ww = window
    padded = F.pad(image, (0, max(ww - w, 0), 0, max(wh - h, 0)))
    ph, pw = padded.shape[-2:]
    tops = sorted({*range(0, ph - wh, stride), ph - wh})
    lefts = sorted({*range(0, pw - ww, stride), pw - ww})
    total, count = None, torch.zeros(1, 1, ph, pw, device=image.device)
    for top in tops:
        for left in lefts:
            logits = model(padded[..., top : top + wh, left : left + ww]).float()
            if total is None:
                total = torch.zeros(*logits.shape[:2], ph, pw, device=image.device)
            total[..., top : top + wh, left : left + ww] += logits
            count[..., top : top + wh, left : left + ww] += 1
    return (total / count)[..., :h, :w]


TTA_SCALES = {"none": (1.0,), "flip": (1.0,), "ms": (0.75, 1.0, 1.25)}


def predict_logits(
    model: nn.Module, image: torch.Tensor, tta: str = "none", window: tuple[int, int] | None = None, stride: int = 0
) -> torch.Tensor:
    """Logits [B, C, H, W] at the image's resolution, averaged over the test-time augmentations: `flip` adds the
    mirrored image, `ms` the scales 0.75, 1 and 1.25, each with its mirror."""
    h, w = image.shape[-2:]

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = sliding_window(model, x, window, stride) if window else model(x).float()
        return (
            F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            if x.shape[-2:] != (h, w)
            else logits
        )

    outputs = []
    for scale in TTA_SCALES[tta]:
        x = image if scale == 1 else F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        outputs.append(forward(x))
        if tta != "none":
            outputs.append(forward(x.flip(-1)).flip(-1))
    return torch.stack(outputs).mean(0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module | None,
    device: torch.device,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
    tta: str = "none",
    window: tuple[int, int] | None = None,
    stride: int = 0,
    on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    show_progress: bool = True,
) -> dict:
    """Mean loss per image (with a criterion), the metrics of the summed confusion matrix, and `confusions`,
    the per-image matrices [N, C, C] that bootstrap intervals resample. on_batch(image, pred, target) sees
    every batch (the uint8 images), e.g. to save pictures. Under torch.distributed each process evaluates its own
    share of the images and the totals are summed over the processes, so the metrics are exact."""
    model.eval()
    loss_sum, confusions = torch.zeros((), device=device), []
    memory_format = memory_format_of(model)  # the data follows the model
    for raw, target in tqdm(
        loader, desc="val", leave=False, dynamic_ncols=True, disable=None if show_progress else True
    ):
        image = normalize(raw.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = predict_logits(model, image, tta, window, stride)
        if criterion is not None:
            loss_sum += criterion(logits, target).detach() * image.shape[0]
        pred = logits.argmax(1)
        confusions.append(per_image_confusion(pred, target, num_classes))
        if on_batch is not None:
            on_batch(raw, pred, target)
    confusions = torch.cat(confusions) if confusions else torch.zeros(0, num_classes, num_classes, dtype=torch.int64)
    total, images = confusions.sum(0).to(device), torch.tensor(float(len(confusions)), device=device)
    if dist.is_initialized():  # each process saw its own share of the images: sum the counts, not the metrics
        for value in (total, loss_sum, images):
            dist.all_reduce(value)
    metrics = metrics_from_confusion(total)
    return {"loss": float(loss_sum / images.clamp_min(1)), **metrics, "confusions": confusions.cpu()}


def bootstrap_miou(*confusions: torch.Tensor, resamples: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    """mIoU [R] of each set of per-image confusion matrices [N, C, C] on the same R resamples of the N images
    (drawn with replacement, their matrices summed). Two sets of the same images make a paired bootstrap."""
    n = confusions[0].shape[0]
    picks = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    times = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, picks, torch.ones(resamples, n).double())
    return [
        iou_from_confusion((times @ m.reshape(n, -1).double()).reshape(resamples, *m.shape[1:]))[1] for m in confusions
    ]


def interval(values: torch.Tensor) -> tuple[float, float]:
    """The central 95% of the bootstrap distribution (percentile interval)."""
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype))
    return float(lo), float(hi)


def compare_verdict(a: torch.Tensor, b: torch.Tensor, resamples: int, seed: int) -> dict:
    """Paired bootstrap of mIoU(B) - mIoU(A) over the same images, in plain words."""
    miou_a, miou_b = iou_from_confusion(a.sum(0))[1], iou_from_confusion(b.sum(0))[1]
    diff = float(miou_b - miou_a)
    boot_a, boot_b = bootstrap_miou(a, b, resamples=resamples, seed=seed)
    lo, hi = interval(boot_b - boot_a)
    above = float((boot_b - boot_a > 0).double().mean())
    if lo > 0:
        verdict = f"B beats A by {diff:.3f} mIoU, 95% CI [{lo:.3f}, {hi:.3f}]"
    elif hi < 0:
        verdict = f"A beats B by {-diff:.3f} mIoU, 95% CI [{-hi:.3f}, {-lo:.3f}]"
    else:
        verdict = f"no significant difference: B - A = {diff:+.3f} mIoU, 95% CI [{lo:.3f}, {hi:.3f}]"
    return {"diff": diff, "ci": [lo, hi], "share_above_zero": above, "verdict": verdict}


def colourize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class-index mask [H, W] -> RGB [H, W, 3]; ignored pixels are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    return lut[mask.astype(np.uint8)]


def save_prediction(
    out: Path, stem: str, image: np.ndarray, pred: np.ndarray, palette: np.ndarray, target=None
) -> None:
    """STEM_pred.png (the coloured prediction) and STEM_overlay.png (the image blended with it, then the coloured
    ground truth beside it when there is one)."""
    coloured = colourize(pred, palette)
    blend = (0.5 * image + 0.5 * coloured).round().astype(np.uint8)
    panels = [blend] if target is None else [blend, colourize(target, palette)]
    Image.fromarray(coloured).save(out / f"{stem}_pred.png")
    Image.fromarray(np.concatenate(panels, axis=1)).save(out / f"{stem}_overlay.png")


def plot_confusion(mat: torch.Tensor, names: list[str], path: Path) -> None:
    """The confusion matrix with each row (true class) normalised to sum to 1."""
    mat = mat.double()
    norm = (mat / mat.sum(1, keepdim=True).clamp_min(1)).numpy()
    n = len(names)
    fig = Figure(figsize=(2 + 0.6 * n, 1.5 + 0.6 * n))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (rows normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


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


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, runs: int, limit: float | None) -> dict:
    """Median seconds of `step` over up to `runs` timed calls after `warmup` untimed ones (synchronised on CUDA);
    timing stops early once the timed calls have taken `limit` seconds, after at least one."""
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if limit is not None and sum(times) >= limit:
                break
    return {"seconds": statistics.median(times), "runs": len(times), "warmup": warmup}


def benchmark(
    model: nn.Module, size: tuple[int, int], batch_size: int, device: torch.device, amp_dtype: torch.dtype | None,
    warmup: int, runs: int, limit: float | None = None,
) -> dict:  # fmt: skip
    """Median latency (ms) of a batch-1 forward pass and images/s at `batch_size`, with how many runs each timed;
    the input in the model's memory format."""

    @torch.inference_mode()
    def timed(batch: int) -> dict:
        x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=memory_format_of(model))

        def forward() -> None:
            with autocast(device, amp_dtype):
                model(x)

        return time_steps(forward, device, warmup, runs, limit)

    latency = timed(1)
    per_batch = latency if batch_size == 1 else timed(batch_size)
    return {"latency_ms": 1000 * latency["seconds"], "images_per_s": batch_size / per_batch["seconds"],
            "timed": (latency["runs"], per_batch["runs"])}  # fmt: skip


# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the model-FLOPs utilisation
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def train_benchmark(
    model: nn.Module, size: tuple[int, int], batch_size: int, device: torch.device, amp_dtype: torch.dtype | None,
    warmup: int, runs: int, limit: float | None = None,
) -> dict:  # fmt: skip
    """Images/s of full training steps (forward, cross-entropy, backward, SGD) on random data, and peak memory."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    x = torch.randn(batch_size, 3, *size, device=device).contiguous(memory_format=memory_format_of(model))
    y = torch.randint(0, 2, (batch_size, *size), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with autocast(device, amp_dtype):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timing = time_steps(step, device, warmup, runs, limit)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # the whole process's peak resident memory (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"images_per_s": batch_size / timing["seconds"], "peak_memory_gib": peak / 2**30, "timed": timing["runs"]}


def cost_models(args: argparse.Namespace) -> Iterator[tuple[str, nn.Module]]:
    """(arch, model) to measure: the checkpoint's model, or --arch (`all`: each arch in turn, built when needed)."""
    if args.checkpoint is not None:
        checkpoint = load_checkpoint(args.checkpoint)
        yield checkpoint["args"]["arch"], model_from_checkpoint(checkpoint, args.checkpoint)
        return
    for arch in ARCHS if args.arch == "all" else (args.arch,):
        stride = args.output_stride if "resnet" in arch and arch.startswith("deeplabv3") else None
        yield arch, build_model(arch, args.num_classes or 19, output_stride=stride)


def timing_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """--warmup, --runs and --time-limit left unset: on CUDA 3 warm-up passes and 10 timed runs (a stable median);
    on the CPU 1 and 3, timing stopped after 30 s, so the slowest arch at 512x1024 takes about a minute."""
    cuda = device.type == "cuda"
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.runs = (10 if cuda else 3) if args.runs is None else args.runs
    args.time_limit = (None if cuda else 30.0) if args.time_limit is None else args.time_limit or None


def print_cost_row(args: argparse.Namespace) -> None:
    """The second study's results columns, a row per model: params (an aux head's apart: only training uses it),
    GMACs, latency, throughput, and how many runs each timing took."""
    size = hw_pair(args.size) or (512, 1024)
    device = torch.device(args.device)
    amp_dtype = amp_dtype_for(args.amp, device)
    timing_defaults(args, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if not args.train:
        limit = f", each timing stopped after {args.time_limit:g} s" if args.time_limit else ""
        print(
            f"measured on {device} ({where}), torch {torch.__version__}, dtype {amp_dtype or torch.float32}, "
            f"channels_last {args.channels_last}, compile {args.compile}, "
            f"median of up to {args.runs} runs after {args.warmup}{limit}"
        )
        print("| arch | input | trainable params | total params | GMACs | GMACs (conv) | latency (ms, batch 1) | "
              "images/s (batch) | runs timed | memory format |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
    for arch, model in cost_models(args):
        (trainable, total), aux = count_params(model), aux_params(model)
        macs, conv_macs = (n / 1e9 for n in count_macs(model, size))
        model = place(model.eval(), arch, args.channels_last, device)
        if args.compile:
            model = torch.compile(model)
        if args.train:
            print_train_row(args, model, arch, size, conv_macs, device, amp_dtype)
            continue
        timing = benchmark(model, size, args.batch_size, device, amp_dtype, args.warmup, args.runs, args.time_limit)
        print(
            f"| {arch} | {size[0]}x{size[1]} | {trainable:,}{f' (+{aux:,} aux head)' if aux else ''} | {total:,} | "
            f"{macs:.2f} | {conv_macs:.2f} | {timing['latency_ms']:.2f} | {timing['images_per_s']:.2f} "
            f"({args.batch_size}) | {' / '.join(map(str, timing['timed']))} | {format_name(model)} |"
        )


def format_name(model: nn.Module) -> str:
    return "channels_last" if memory_format_of(model) == torch.channels_last else "contiguous"


def print_train_row(args, model, arch, size, macs, device, amp_dtype) -> None:
    """Training throughput (in channels_last also the contiguous figure, measured after it, for comparison); on CUDA
    also the achieved TFLOP/s (a training step is counted as 3x the forward FLOPs) beside the GPU's dense bf16
    peak, which gives the model-FLOPs utilisation."""
    timing = (size, args.batch_size, device, amp_dtype, args.warmup, args.runs, args.time_limit)
    result, chosen = train_benchmark(model, *timing), format_name(model)
    where = f"{device}, dtype {amp_dtype or torch.float32}, batch {args.batch_size}"
    print(f"train step of {arch} at {size[0]}x{size[1]} on {where}, median of {result['timed']} after {args.warmup}")
    line = f"train: {result['images_per_s']:.2f} images/s ({chosen})"
    if chosen == "channels_last":
        contiguous = train_benchmark(model.to(memory_format=torch.contiguous_format), *timing)
        line += f" | contiguous {contiguous['images_per_s']:.2f} images/s"
    line += f" | peak memory {result['peak_memory_gib']:.2f} GiB"
    if device.type == "cuda":
        achieved = 3 * 2 * macs * 1e9 * result["images_per_s"] / 1e12
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        line += f" | {achieved:.1f} TFLOP/s achieved"
        line += f" of {peak:.0f} peak bf16 (MFU {achieved / peak:.1%})" if peak else " (peak of this GPU unknown)"
    print(line)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Metrics, bootstrap interval, optional paired comparison, pictures and JSON for one checkpoint."""
    checkpoint = load_checkpoint(args.checkpoint)
    model, names = model_from_checkpoint(checkpoint, args.checkpoint), checkpoint["class_names"]
    class_map = checkpoint_class_map(checkpoint)
    run = checkpoint["args"]
    size = hw_pair(args.size) if args.size else hw_pair(run.get("size"))
    data = args.data if args.data is not None else (Path(run["data"]) if run.get("data") else None)
    layout = args.layout if args.data is not None else run.get("layout", "auto")
    device = torch.device(args.device)
    model = place(model, run["arch"], args.channels_last, device)
    window = hw_pair(args.sliding_window, "--sliding-window")
    stride = args.stride or (min(window) // 2 if window else 0)
    infer = lambda m, x: predict_logits(m, x, args.tta, window, stride)  # noqa: E731
    if args.predict:
        out = args.save_predictions or Path("predictions")
        return predict_files(model, args.predict, size, out, device, class_map.palette, infer)

    dataset = build_dataset(data, layout, args.split, TransformConfig(size=size, train=False), class_map, args.seed)
    pictures = args.save_predictions
    loader = DataLoader(
        dataset, batch_size=1 if pictures else args.batch_size, num_workers=args.workers, collate_fn=collate
    )
    on_batch = None
    if pictures:
        pictures.mkdir(parents=True, exist_ok=True)
        stems = iter(image.stem for image, _ in dataset.pairs)

        def on_batch(image: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> None:
            image, pred, target = image[0].permute(1, 2, 0).numpy(), pred[0].cpu().numpy(), target[0].cpu().numpy()
            save_prediction(pictures, next(stems), image, pred, dataset.class_map.palette, target)

    amp_dtype = amp_dtype_for(args.amp, device)
    result = evaluate(model, loader, None, device, len(names), amp_dtype, args.tta, window, stride, on_batch)
    confusions = result.pop("confusions")
    boot = bootstrap_miou(confusions, resamples=args.bootstrap, seed=args.seed)[0]
    result.update(checkpoint=str(args.checkpoint), split=args.split, images=len(dataset), class_names=names)
    result["miou_ci"] = interval(boot)

    print(f"{args.checkpoint} on split {args.split!r} ({len(dataset)} images, tta {args.tta})")
    lo, hi = result["miou_ci"]
    print(
        f"mIoU {result['miou']:.4f} (95% CI [{lo:.4f}, {hi:.4f}], {args.bootstrap} bootstrap resamples of the images)"
    )
    print(f"pixel acc {result['pixel_acc']:.4f}")
    print(f"  {'class':<20} {'IoU':>7} {'share':>7} {'precision':>9} {'recall':>7}")
    for row in zip(names, result["iou"], result["share"], result["precision"], result["recall"]):
        print(f"  {row[0]:<20} " + " ".join(f"{v:>{w}.4f}" for v, w in zip(row[1:], (7, 7, 9, 7))))

    if args.compare_checkpoint:
        other = load_checkpoint(args.compare_checkpoint)
        if other["num_classes"] != len(names):
            raise ModelError(f"--compare-checkpoint has {other['num_classes']} classes, --checkpoint {len(names)}")
        other_model = place(model_from_checkpoint(other, args.compare_checkpoint), other["args"]["arch"],
                            args.channels_last, device)  # fmt: skip
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
        theirs = evaluate(other_model, loader, None, device, len(names), amp_dtype, args.tta, window, stride)
        result["comparison"] = compare_verdict(confusions, theirs["confusions"], args.bootstrap, args.seed)
        result["comparison"].update(a=str(args.checkpoint), b=str(args.compare_checkpoint), miou_b=theirs["miou"])
        print(f"A = {args.checkpoint} (mIoU {result['miou']:.4f})")
        print(f"B = {args.compare_checkpoint} (mIoU {theirs['miou']:.4f})")
        share = result["comparison"]["share_above_zero"]
        print(f"{result['comparison']['verdict']} (B ahead in {share:.1%} of resamples)")
    if args.confusion:
        plot_confusion(confusions.sum(0), names, args.confusion)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def checkpoint_class_map(checkpoint: dict) -> ClassMap:
    """The class map the model was trained with (checkpoints written before class maps: its layout's table, or
    ids 0..C-1 for the folder layout)."""
    if "class_map" in checkpoint:
        return ClassMap.from_dict(checkpoint["class_map"])
    names = tuple(checkpoint["class_names"])
    for table in (offroad_table(), cityscapes_table()):
        if names == table.names:
            return table.class_map("index")
    return numbered_table(len(names), list(names)).class_map("index")


def predict_files(model, paths, size, out, device, palette, infer) -> dict:
    """Coloured predictions and overlays for images that have no labels."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    for path in paths:
        raw = read_image(Path(path))
        image, _ = transform_pair(
            raw, torch.zeros(raw.shape[-2:], dtype=torch.uint8), TransformConfig(size=size, train=False)
        )
        with torch.no_grad():
            x = normalize(image[None].to(device)).contiguous(memory_format=memory_format_of(model))
            pred = infer(model, x).argmax(1)[0].cpu().numpy()
        save_prediction(out, Path(path).stem, image.permute(1, 2, 0).numpy(), pred, palette)
    print(f"wrote predictions of {len(paths)} images to {out}")
    return {"predicted": [str(p) for p in paths]}


def main(args: argparse.Namespace) -> None:
    try:
        if args.compare:
            files = compare_runs(args.compare, args.report)
            print(f"wrote {len(files)} files to {args.report}: {', '.join(f.name for f in files)}")
        elif args.benchmark:
            print_cost_row(args)
        elif args.checkpoint is not None:
            evaluate_checkpoint(args)
        else:
            sys.exit("error: give --checkpoint (evaluate), --benchmark (cost table) or --compare RUN... (report)")
    except (DatasetError, ModelError) as e:
        sys.exit(f"error: {one_line(e)}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Evaluate, compare and benchmark DeepLab models", add_help=add_help)
    parser.add_argument("--checkpoint", type=Path, default=None, help="best.pth or last.pth of a run")
    add_data_args(parser)
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="resize to H W (default: as trained)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", choices=("bf16", "fp16", "off"), help="mixed precision on CUDA")
    parser.add_argument(
        "--tta", default="none", choices=tuple(TTA_SCALES), help="flip, or ms: scales 0.75/1/1.25 + flip"
    )
    parser.add_argument("--sliding-window", type=int, nargs="+", default=None, metavar="H W", help="predict by windows")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: half a window)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% CI of mIoU")
    parser.add_argument("--compare-checkpoint", type=Path, default=None, help="paired bootstrap against this model")
    parser.add_argument("--confusion", type=Path, default=None, help="write the row-normalised confusion matrix PNG")
    parser.add_argument("--save-predictions", type=Path, default=None, help="write coloured predictions and overlays")
    parser.add_argument("--predict", nargs="+", default=None, metavar="IMAGE", help="predict unlabelled images")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RUN", help="run folders to compare")
    parser.add_argument("--report", type=Path, default=Path("report"), help="output folder of --compare")
    parser.add_argument("--benchmark", action="store_true", help="print the cost row: params, GMACs, latency")
    parser.add_argument("--train", action="store_true", help="--benchmark training steps instead of inference")
    parser.add_argument(
        "--arch", default="deeplabv2_resnet101", choices=(*ARCHS, "all"), help="model for --benchmark (all: each)"
    )
    parser.add_argument(
        "--output-stride",
        type=int,
        default=None,
        choices=(8, 16),
        help="--benchmark: of the ResNet DeepLabV3/V3+ archs",
    )
    parser.add_argument(
        "--channels-last", default="auto", choices=("auto", "on", "off"),
        help="memory format (auto: channels_last where measured faster for the arch and device)",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="--benchmark a torch.compile'd model")
    parser.add_argument("--warmup", type=int, default=None, help="--benchmark passes before timing (CUDA 3, CPU 1)")
    parser.add_argument("--runs", type=int, default=None, help="--benchmark timed passes at most (CUDA 10, CPU 3)")
    parser.add_argument(
        "--time-limit", type=float, default=None, metavar="S", help="stop timing after S s (CPU 30; 0: never)"
    )
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
