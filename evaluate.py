"""Metrics (ConfusionMatrix), the validation loop, prediction, evaluation of a trained model, ONNX export, run
comparison and benchmarks.

    python evaluate.py --checkpoint runs/x/best.pth [--data ROOT] [--split val]

From Python: `predict(model, images)` and `evaluate_model(model, data)` with `models.load_model(path)` (README,
"Use from Python"); the command line is a thin layer over them.
"""

import argparse
import contextlib
import csv
import glob
import html
import json
import math
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from annotations import (
    LABEL_STUDIO_LOCAL_FILES,
    PRE_LABEL_WRITERS,
    link_or_copy,
    pixel_limit_for_workers,
    read_json,
    set_pixel_limit,
)
from dataset import (
    COUNT,
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NON_NEGATIVE,
    POSITIVE_INT,
    ArgumentParser,
    ClassMap,
    DatasetError,
    HeightWidth,
    SegmentationDataset,
    TransformConfig,
    add_data_args,
    build_dataset,
    cannot_write,
    collate,
    detectable,
    displayed,
    hw_pair,
    image_size,
    list_pairs,
    nested_datasets,
    normalize,
    one_line,
    open_data,
    out_of_memory,
    read_image,
    resize_image,
    within_pixel_limit,
    writable_file,
    writable_folder,
)
from models import (
    ARCHS,
    DEFAULT_DEVICE,
    ModelError,
    aux_params,
    build_model,
    checkpoint_class_map,
    count_macs,
    count_params,
    device_name,
    layout_choice,
    load_checkpoint,
    load_model,
    measured_layout,
    memory_format_of,
    model_from_checkpoint,
    model_input,
    model_with_classes,
)

# ---- metrics: confusion matrices, IoU, precision and recall ----------------------------------------------------------


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


def reliability_counts(
    probs: torch.Tensor, target: torch.Tensor, bins: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """[C, bins, 2] counts of the labelled pixels of a batch (probs [B, C, H, W], target [B, H, W]) by predicted
    class, max-softmax bin (bin k holds k/bins to (k+1)/bins) and whether the prediction was wrong (0) or right
    (1): from it, how often a pixel predicted as a class at a confidence is right."""
    c = probs.shape[1]
    conf, pred = probs.float().max(1)
    counted = (target >= 0) & (target < c) & (target != ignore_index)
    cell = (pred * bins + (conf * bins).long().clamp_max(bins - 1)) * 2 + (pred == target).long()
    cell = torch.where(counted, cell, c * bins * 2)
    return torch.bincount(cell.flatten(), minlength=c * bins * 2 + 1)[: c * bins * 2].reshape(c, bins, 2)


def iou_from_confusion(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU [..., C] (NaN where a class's union is zero) and mIoU [...] (mean over the other classes)
    of confusion matrices [..., C, C]."""
    mat = mat.double()
    diag = mat.diagonal(dim1=-2, dim2=-1)
    union = mat.sum(-1) + mat.sum(-2) - diag
    iou = torch.where(union > 0, diag / union.clamp_min(1), torch.full_like(diag, math.nan))
    return iou, iou.nanmean(dim=-1)


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


# ---- evaluation: mixed precision, sliding windows, test-time augmentation, the validation loop -----------------------


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


@dataclass(frozen=True)
class InferenceOptions:
    """How logits are computed: test-time augmentation (none, flip or ms), a sliding window (H, W) and its stride
    (0: half the window's smaller side), and mixed precision (bf16, fp16 or off; CUDA only)."""

    tta: str = "none"
    window: tuple[int, int] | None = None
    stride: int = 0
    amp: str = "off"

    @property
    def window_stride(self) -> int:
        return self.stride or (min(self.window) // 2 if self.window else 0)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, C, H, W] of the normalised images x, at their resolution."""
        with autocast(x.device, amp_dtype_for(self.amp, x.device)):
            return predict_logits(model, x, self.tta, self.window, self.window_stride).float()


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
    """Mean loss per image (with a criterion), the metrics of the summed confusion matrix, `confusions`, the
    per-image matrices [N, C, C] that bootstrap intervals resample, and `reliability` (reliability_counts).
    on_batch(image, logits, target) sees every batch (the uint8 images), e.g. to save pictures. Under
    torch.distributed each process evaluates its own share of the images and the totals are summed over the
    processes, so the metrics are exact."""
    model.eval()
    loss_sum, confusions = torch.zeros((), device=device), []
    reliability = torch.zeros(num_classes, RELIABILITY_BINS, 2, dtype=torch.int64, device=device)
    for raw, target in tqdm(
        loader, desc="val", leave=False, dynamic_ncols=True, disable=None if show_progress else True
    ):
        image = model_input(raw, model, device)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = predict_logits(model, image, tta, window, stride)
        if criterion is not None:
            loss_sum += criterion(logits, target).detach() * image.shape[0]
        pred = logits.argmax(1)
        confusions.append(per_image_confusion(pred, target, num_classes))
        reliability += reliability_counts(logits.float().softmax(1), target, RELIABILITY_BINS)
        if on_batch is not None:
            on_batch(raw, logits, target)
    confusions = torch.cat(confusions) if confusions else torch.zeros(0, num_classes, num_classes, dtype=torch.int64)
    total, images = confusions.sum(0).to(device), torch.tensor(float(len(confusions)), device=device)
    if dist.is_initialized():  # each process saw its own share of the images: sum the counts, not the metrics
        for value in (total, loss_sum, images, reliability):
            dist.all_reduce(value)
    metrics = metrics_from_confusion(total)
    return {"loss": float(loss_sum / images.clamp_min(1)), **metrics, "confusions": confusions.cpu(),
            "reliability": reliability.cpu()}


# ---- paired comparison: bootstrap over the images --------------------------------------------------------------------


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


# ---- pictures: coloured masks, overlays with a legend, the confusion matrix ------------------------------------------


def colourize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class-index mask [H, W] -> RGB [H, W, 3]; ignored pixels are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    return lut[mask.astype(np.uint8)]


def legend(picture: np.ndarray, entries: list[tuple[tuple, str]]) -> np.ndarray:
    """`picture` [H, W, 3] with a white panel on its right naming each (colour, name) entry beside its colour."""
    font = ImageFont.load_default()
    row, width = 14, 28 + max((int(font.getlength(name)) for _, name in entries), default=0)
    panel = Image.new("RGB", (width, max(picture.shape[0], 8 + row * len(entries))), "white")
    draw = ImageDraw.Draw(panel)
    for k, (colour, name) in enumerate(entries):
        y = 4 + k * row
        draw.rectangle((4, y, 15, y + 11), fill=tuple(int(v) for v in colour), outline="black")
        draw.text((20, y), name, fill="black", font=font)
    picture = np.pad(picture, ((0, panel.height - picture.shape[0]), (0, 0), (0, 0)), constant_values=255)
    return np.concatenate([picture, np.asarray(panel)], axis=1)


def with_legend(picture: np.ndarray, classes: list[int], class_map: ClassMap) -> np.ndarray:
    """The picture [H, W, 3] with a white panel on its right naming `classes` beside their colours, so that it
    can be read without the class table (the picture is padded below when the list is the taller)."""
    return legend(picture, [(class_map.palette[c], class_map.names[c]) for c in classes])


ERROR_COLOURS = {"correct": (56, 168, 82), "wrong": (214, 39, 40), "ignored": (170, 170, 170)}


def error_map(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Correct, wrong and ignored pixels in three plain colours."""
    picture = np.empty((*target.shape, 3), np.uint8)
    picture[pred == target] = ERROR_COLOURS["correct"]
    picture[pred != target] = ERROR_COLOURS["wrong"]
    picture[target == IGNORE_INDEX] = ERROR_COLOURS["ignored"]
    return picture


def class_ids(class_map: ClassMap) -> np.ndarray:
    """Each class's raw mask value as the dataset's masks store it (the smallest, where a class has several): for
    a Cityscapes model the labelIds of its trainIds, which the official benchmark server expects."""
    if class_map.encoding == "colour":
        raise DatasetError("--label-ids: this model's masks are colours; NAME_color.png holds its predictions in them")
    ids = np.zeros(class_map.num_classes, np.int64)
    for key, c in sorted(zip(class_map.keys, class_map.classes), reverse=True):
        if c < class_map.num_classes:
            ids[c] = key
    return ids


def write_prediction(
    path: Path, image: np.ndarray, pred: np.ndarray, class_map: ClassMap, conf: np.ndarray | None = None,
    target: np.ndarray | None = None, ids: np.ndarray | None = None,
) -> None:
    """For path `DIR/NAME`: NAME.png, the class indices as an 8-bit single-channel PNG (`ids`: each class's raw
    id instead, 16-bit where they need it); NAME_color.png, the prediction in the class colours; NAME_overlay.png,
    the image blended with it (the coloured ground truth beside it when there is one), both with a legend of the
    classes present; with `conf` (max softmax, 0-1) NAME_conf.png; with a target NAME_gt.png (indices, 255 ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = pred.astype(np.uint8) if ids is None else ids[pred]
    Image.fromarray(raw.astype(np.uint16) if raw.max(initial=0) > 255 else raw.astype(np.uint8)).save(f"{path}.png")
    coloured = colourize(pred, class_map.palette)
    panels = [(0.5 * image + 0.5 * coloured).round().astype(np.uint8)]
    present = set(np.unique(pred).tolist())
    if target is not None:
        panels.append(colourize(target, class_map.palette))
        present |= set(np.unique(target).tolist()) - {IGNORE_INDEX}
        Image.fromarray(target.astype(np.uint8)).save(f"{path}_gt.png")
    present = sorted(present)
    Image.fromarray(with_legend(coloured, present, class_map)).save(f"{path}_color.png")
    Image.fromarray(with_legend(np.concatenate(panels, axis=1), present, class_map)).save(f"{path}_overlay.png")
    if conf is not None:
        Image.fromarray((conf * 255).round().astype(np.uint8)).save(f"{path}_conf.png")


def _save(fig: Figure, path: Path) -> None:
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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


# ---- the images worth labelling next: what the labelled frames do not cover, ranking.csv ----------------------------

RELIABILITY_BINS = 10  # max-softmax bins of the validation split's reliability counts, kept in each checkpoint
RELIABILITY_PRIOR = 1.0  # pseudo-pixels by which a sparse bin leans on its class's precision
RANKING = "ranking.csv"
THUMBNAIL = (24, 32)  # (H, W): the embedding of an image without a model (no checkpoint, or an ONNX file)
COVERAGE_TARGETS = 4096  # pool frames whose coverage is measured; a larger pool is sampled down to this many
LAZY_CHECKS = 16  # frames whose gain coverage_order recomputes at a time, those of the highest bounds


class LabellingScore:
    """An image's score, the share of its pixels estimated wrong: each pixel's chance of being right, looked up
    by its predicted class and max-softmax bin in the validation split's reliability counts [C, bins, 2] (a
    sparse bin leaning on the class's precision), averaged and taken from 1. The model's confidence alone does
    not rank images by their error: it is confidently wrong on whole regions, and how often a class's pixels are
    wrong is what the validation split measures (BENCHMARKS.md). Without counts (a checkpoint written before
    they were kept, an ONNX file): 1 - max softmax. Call it on softmax [C, H, W]: (score, each class's share)."""

    def __init__(self, reliability: torch.Tensor | None, num_classes: int):
        self.rates = None if reliability is None else self.chance_right(reliability.double())
        self.what = ("the share of pixels estimated wrong (by the validation split's precision per predicted class "
                     "and confidence)" if self.rates is not None else "1 - max softmax (the checkpoint keeps no "
                     "validation reliability counts)")
        self.num_classes = num_classes

    @staticmethod
    def chance_right(counts: torch.Tensor) -> torch.Tensor:
        per_class = counts.sum(1)
        precision = (per_class[:, 1] + 1) / (per_class.sum(1) + 2)  # a class never predicted there: even odds
        return (counts[..., 1] + RELIABILITY_PRIOR * precision[:, None]) / (counts.sum(-1) + RELIABILITY_PRIOR)

    def __call__(self, probs: torch.Tensor) -> tuple[float, list[float]]:
        conf, pred = probs.float().max(0)
        shares = torch.bincount(pred.flatten(), minlength=self.num_classes).double() / pred.numel()
        if self.rates is None:
            return float(1 - conf.mean()), shares.tolist()
        bins = (conf * self.rates.shape[1]).long().clamp_max(self.rates.shape[1] - 1)
        right = self.rates.to(probs.device)[pred, bins]
        return float(1 - right.mean()), shares.tolist()


def labelling_score(checkpoint: dict | None, num_classes: int) -> LabellingScore:
    reliability = (checkpoint or {}).get("val_reliability")
    usable = isinstance(reliability, torch.Tensor) and reliability.shape[0] == num_classes
    return LabellingScore(reliability if usable else None, num_classes)


class BackboneFeatures:
    """A forward hook on a model's backbone that keeps what each image looks like to the model: its last features
    averaged over space, then over the backbone's calls for the batch (TTA views, sliding windows), L2-normalised,
    so that two images' distance is their features' cosine (in 0..2). take() gives the batch's [B, D]."""

    def __init__(self, model: nn.Module):
        self.total, self.calls = None, 0
        self.handle = model.backbone.register_forward_hook(self.hook)

    def hook(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor | dict) -> None:
        pooled = (output["out"] if isinstance(output, dict) else output).float().mean((-2, -1))
        self.total, self.calls = pooled if self.total is None else self.total + pooled, self.calls + 1

    def take(self) -> torch.Tensor:
        features, self.total, self.calls = F.normalize(self.total / self.calls, dim=1), None, 0
        return features.cpu()


def thumbnails(files: list[Path], workers: int = 0) -> torch.Tensor:
    """The embedding without a model [N, 3 * 24 * 32]: each image as displayed, shrunk to THUMBNAIL, its RGB in
    0..1 scaled so that two images' distance is their root-mean-square pixel difference."""
    loader = DataLoader(ImageFiles(files, THUMBNAIL, originals=False), batch_size=32, num_workers=workers,
                        collate_fn=stack_batch, worker_init_fn=pixel_limit_for_workers())
    rows = [inputs.float().flatten(1) for inputs, _, _ in tqdm(loader, desc="thumbnails", unit="batch", disable=None)]
    return torch.cat(rows) / (255 * math.sqrt(3 * THUMBNAIL[0] * THUMBNAIL[1]))


@dataclass(frozen=True)
class Pick:
    """One frame of the coverage order: its index in the pool, how much nearer it brings the pool to the frames
    chosen (the drop in the summed distance, per pool frame), and the nearest frame already labelled or picked
    before it (a pool index, or -1 - i for labelled frame i; None for the very first) at `distance`; `beside`: the
    labelled or picked frame next to it in its sequence that moved it to the end (apart), numbered the same way."""

    index: int
    gain: float
    distance: float
    nearest: int | None
    beside: int | None = None


def coverage_order(pool: torch.Tensor, labelled: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                   seed: int = 0) -> list[Pick]:
    """Every frame of the pool [N, D] in the order that covers it best, the labelled frames [M, D] counting as
    covered: greedy facility location (k-medoids), each next frame the one that most lowers the sum over the pool
    of each frame's distance to its nearest labelled or chosen frame. A near-duplicate of a frame already there
    lowers it by almost nothing, and so does an outlier, which covers only itself: the order goes from the most
    typical uncovered frames outwards (TypiClust, Hacohen et al. 2022, makes the same case at small budgets).
    Lazy greedy: a frame's gain only falls as frames are chosen, so a stale gain is an upper bound, and a frame
    whose fresh gain passes every other frame's bound is the best. Pools over COVERAGE_TARGETS frames are covered
    as measured on a sample of that many (seeded). `weights` [N]: how much each pool frame's distance counts
    (default: alike)."""
    n = len(pool)
    kept = torch.arange(n) if n <= COVERAGE_TARGETS else torch.randperm(
        n, generator=torch.Generator().manual_seed(seed))[:COVERAGE_TARGETS]
    targets, weight = pool[kept], torch.ones(len(kept)) if weights is None else weights[kept].float()
    distances = torch.cat([torch.cdist(chunk, targets) for chunk in pool.split(1024)])  # [N, T]
    near, near_frame = torch.full((n,), math.inf), torch.full((n,), -1)  # each pool frame's nearest covered frame
    if labelled is not None and len(labelled):
        to_labelled = torch.cat([torch.cdist(chunk, labelled) for chunk in pool.split(1024)])
        near, near_frame = to_labelled.min(1).values, -1 - to_labelled.argmin(1)
    cover = near[kept] if labelled is not None and len(labelled) else distances.max().expand(len(kept)).clone()
    bound = ((cover - distances).clamp_min(0) * weight).sum(1)  # each frame's gain: once stale, an upper bound
    squared = (pool * pool).sum(1)
    order = []
    while len(order) < n:
        checked = bound.topk(min(LAZY_CHECKS + 1, n - len(order))).indices  # frames picked are at -inf
        gains = ((cover - distances[checked[:LAZY_CHECKS]]).clamp_min(0) * weight).sum(1)
        bound[checked[:LAZY_CHECKS]] = gains
        best = int(gains.argmax())
        if len(checked) > LAZY_CHECKS and gains[best] < bound[checked[-1]]:  # a frame not checked may gain more
            continue
        i, first = int(checked[best]), math.isinf(near[checked[best]])
        order.append(Pick(i, float(gains[best] / weight.sum()), float(near[i]), None if first else int(near_frame[i])))
        bound[i], cover = -math.inf, torch.minimum(cover, distances[i])
        if n <= COVERAGE_TARGETS:  # every pool frame is a target: its distance to the pick is already there
            to_pick = distances[:, i]
        else:
            to_pick = (squared - 2 * pool @ pool[i] + squared[i]).clamp_min(0).sqrt()
        near, near_frame = torch.minimum(near, to_pick), torch.where(to_pick < near, i, near_frame)
    return order


def sequence_place(name: str) -> tuple[str, int] | None:
    """A frame's sequence and its place in it, read from its file name: the name up to its last number, and that
    number ("0001TP_006690.png" -> ("0001TP_", 6690), "IMG_0042.jpg" -> ("IMG_", 42)); None for a name that does not
    end in a number."""
    found = re.fullmatch(r"(.*?)(\d+)", Path(name).stem)
    return (found[1], int(found[2])) if found else None


def apart(order: list[Pick], files: list[Path], labelled: list[Path]) -> list[Pick]:
    """`order` (of the pool `files`) with every frame next to a labelled frame or an earlier pick in its sequence
    (sequence_place; nothing of the pool or the labelled frames between them) moved after all the others, each part
    in its own order, with `beside` that frame. Coverage of an embedding alone picks neighbouring frames of a video
    (a second frame a second later, which teaches little the first does not); by file name, so frames of several
    folders named alike count as one sequence."""
    frames, sequences = [*files, *labelled], {}
    for k, frame in enumerate(frames):  # k: a pool index, or len(files) + i for labelled frame i
        place = sequence_place(frame.name)
        if place is not None:
            sequences.setdefault(place[0], []).append((place[1], k))
    next_to: dict[int, list[int]] = {}
    for members in sequences.values():
        members.sort()
        for (_, a), (_, b) in zip(members, members[1:]):
            next_to.setdefault(a, []).append(b)
            next_to.setdefault(b, []).append(a)
    taken, first, later = set(range(len(files), len(frames))), [], []
    for pick in order:
        near = [k for k in next_to.get(pick.index, []) if k in taken]
        if near:
            later.append(replace(pick, beside=near[0] if near[0] < len(files) else len(files) - 1 - near[0]))
        else:
            first.append(pick)
            taken.add(pick.index)
    return first + later


def write_ranking(path: Path, files: list[Path], order: list[Pick], scores: dict[int, tuple[float, list[float]]],
                  names: list[str], labelled: list[Path]) -> Path:
    """ranking.csv: every image in the order picked (coverage_order, then apart), with why: the coverage it adds
    (gain), the nearest frame labelled or picked before it in the coverage order and its distance, the labelled or
    picked frame beside it in its sequence (for the frames moved to the end), the score (the share of its pixels
    estimated wrong) and the predicted share of each class (both blank without a model)."""
    frame = lambda k: "" if k is None else str(labelled[-1 - k] if k < 0 else files[k])  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "image", "gain", "distance", "nearest", "beside", "score", *names])
        for rank, pick in enumerate(order, 1):
            score, shares = scores.get(pick.index, ("", []))
            writer.writerow([rank, str(files[pick.index]), f"{pick.gain:.6f}",
                             "" if pick.nearest is None else f"{pick.distance:.6f}", frame(pick.nearest),
                             frame(pick.beside), score if score == "" else f"{score:.6f}",
                             *(f"{v:.6f}" for v in shares)])
    return path


# ---- prediction: images, folders and patterns in; index, colour, overlay and confidence PNGs out ---------------------


def find_images(paths: list[str], recursive: bool = False) -> list[tuple[Path, Path]]:
    """(image, where its outputs go relative to --out) for each of `paths`: a file (its name), a folder (its
    images, sorted, by their path inside it; with `recursive` its subfolders' too) or a glob pattern (its
    matches, by their path below the pattern's first wildcard)."""
    found = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            found.append((path, Path(path.name)))
            continue
        if path.is_dir():
            base, candidates = path, path.rglob("*") if recursive else path.iterdir()
        elif any(c in given for c in "*?["):
            first = next(i for i, part in enumerate(path.parts) if any(c in part for c in "*?["))
            base, candidates = Path(*path.parts[:first]), (Path(p) for p in glob.glob(given, recursive=True))
        else:
            raise DatasetError(f"--predict {given}: no such file or folder")
        images = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            deeper = (
                path.is_dir() and not recursive and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))
            )
            what = f"folder {given} holds no images" if path.is_dir() else f"{given!r} matches no image"
            hint = " (its subfolders do: add --recursive)" if deeper else " (any format Pillow reads: .png, .jpg, ...)"
            raise DatasetError(f"--predict {what}{hint}")
        found += [(p, p.relative_to(base)) for p in images]
    outputs = {}
    for image, relative in found:
        if relative.with_suffix("") in outputs:
            raise DatasetError(
                f"--predict: {outputs[relative.with_suffix('')]} and {image} would write the same files "
                f"{relative.with_suffix('')}*.png; predict them into different --out folders"
            )
        outputs[relative.with_suffix("")] = image
    return found


class ImageFiles(Dataset):
    """Images to predict: (the uint8 image [3, h, w] at `size`, or as it is with size None; the original, or None
    without `originals`; index)."""

    def __init__(self, files: list[Path], size: tuple[int, int] | None, originals: bool = True):
        self.files, self.size, self.originals = files, size, originals

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        image = read_image(self.files[index])
        return (resize_image(image, self.size) if self.size else image), image if self.originals else None, index


def same_size_batches(sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of images of one size: nothing is padded, so each prediction is the image's own."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def stack_batch(batch: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, list, list[int]]:
    inputs, originals, indices = zip(*batch)
    return torch.stack(inputs), list(originals), list(indices)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any: ONNX Runtime's)."""
    return next(model.parameters(), torch.empty(0)).device


def to_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits [C, h, w] resized (bilinear) to `size`, unless they are that size already."""
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def predicted_images(
    model: nn.Module, files: list[Path], size: tuple[int, int] | None, options: InferenceOptions, batch_size: int,
    workers: int, embed: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(index into files, the image as displayed [3, H, W] uint8, its softmax [C, H, W], with `embed` its
    BackboneFeatures [D]) for every file, in same-size batches; the logits are resized to each image's own size
    first."""
    sizes = [size or image_size(path)[::-1] for path in files]
    loader = DataLoader(ImageFiles(files, size), batch_sampler=same_size_batches(sizes, batch_size),
                        num_workers=workers, collate_fn=stack_batch, worker_init_fn=pixel_limit_for_workers())
    device = device_of(model)
    model.eval()
    features = BackboneFeatures(model) if embed else None
    try:
        for inputs, originals, indices in tqdm(loader, desc="predicting", unit="batch", disable=None):
            x = model_input(inputs, model, device)
            logits = options.logits(model, x)
            embeddings = features.take() if features else [None] * len(indices)
            for logit, original, index, embedding in zip(logits, originals, indices, embeddings):
                yield index, original, to_size(logit, tuple(original.shape[-2:])).softmax(0), embedding
    finally:
        if features:
            features.handle.remove()


def predict_images(
    model: nn.Module, paths: list[str], out: Path, class_map: ClassMap, *, size: tuple[int, int] | None = None,
    recursive: bool = False, options: InferenceOptions = InferenceOptions(), batch_size: int = 4, workers: int = 0,
    save_probs: bool = False, label_ids: bool = False, scorer: LabellingScore | None = None,
    select: int | None = None, labelled: list[Path] | None = None, pre_label: tuple[str, ...] = (),
    image_url: str = LABEL_STUDIO_LOCAL_FILES, model_version: str = "",
) -> dict:
    """Predict every image of `paths` (find_images) and write its files (write_prediction) under `out`, mirroring
    the inputs' relative paths, and out/ranking.csv: every image in the order that best covers what the
    `labelled` frames do not (coverage_order of what the model sees, BackboneFeatures; of thumbnails for a model
    without a backbone, ONNX), with its LabellingScore. `select`: only the first N images' files are written (a
    first pass orders them all). `pre_label`: the predictions also as each tool's import
    (annotations.PRE_LABEL_WRITERS), in out/<format>/."""
    found = find_images(paths, recursive)
    for image, relative in found:
        if (out / relative).with_suffix(".png").resolve() == image.resolve():
            raise DatasetError(f"--out {out} would overwrite the input image {image}; choose another --out")
    files, names = [image for image, _ in found], [relative.with_suffix("").as_posix() for _, relative in found]
    scorer, labelled = scorer or LabellingScore(None, class_map.num_classes), labelled or []
    frames = partial(predicted_images, model, size=size, options=options, batch_size=batch_size, workers=workers)
    writers = [PRE_LABEL_WRITERS[f](out, list(class_map.names), class_map.palette, model_version, image_url)
               for f in pre_label]
    ids = class_ids(class_map) if label_ids else None

    def write(i: int, original: torch.Tensor, probs: torch.Tensor) -> None:
        conf, pred = probs.max(0)
        pred, conf, picture = pred.to(torch.uint8).cpu().numpy(), conf.cpu().numpy(), original.permute(1, 2, 0)
        write_prediction(out / names[i], picture.numpy(), pred, class_map, conf if save_probs else None, ids=ids)
        for writer in writers:
            writer.add(names[i], files[i], pred, conf, scores[i][0])

    embed = isinstance(getattr(model, "backbone", None), nn.Module)
    scores, embeddings = {}, {}
    for i, original, probs, embedding in frames(files, embed=embed):
        scores[i], embeddings[i] = scorer(probs), embedding
        if select is None:
            write(i, original, probs)
    pool = torch.stack([embeddings[i] for i in range(len(files))]) if embed else thumbnails(files, workers)
    known = (embedded(frames, labelled) if embed else thumbnails(labelled, workers)) if labelled else None
    order = apart(coverage_order(pool, known), files, labelled)
    chosen = [pick.index for pick in order[:select]] if select is not None else list(range(len(files)))
    if select is not None:
        for k, original, probs, _ in frames([files[i] for i in chosen]):
            write(chosen[k], original, probs)
    imports = [str(writer.close()) for writer in writers]
    ranking = write_ranking(out / RANKING, files, order, scores, class_map.names, labelled)
    print(f"wrote the predictions of {len(chosen)} images to {out}" + "".join(f", {p}" for p in imports)
          + f"; {ranking} orders all {len(files)} by what {len(labelled)} labelled frames leave uncovered, "
          f"{sum(p.beside is not None for p in order)} beside a labelled or earlier frame of their sequence last, "
          f"scored by {scorer.what}")
    return {"predicted": [str(files[i]) for i in chosen], "out": str(out), "ranking": str(ranking),
            "pre_labels": imports}


def embedded(frames: Callable, files: list[Path]) -> torch.Tensor:
    """[N, D]: the BackboneFeatures of each of `files`, through `frames` (predicted_images)."""
    rows = {i: embedding for i, _, _, embedding in frames(files, embed=True)}
    return torch.stack([rows[i] for i in range(len(files))])


def labelled_frames(labelled: Path | None, run: dict) -> tuple[list[Path], str]:
    """The frames already labelled, which the ranking counts as covered, and where they come from in words: the
    training split of `labelled` where it holds a dataset (else its images, subfolders too), or else the training
    split of the data the checkpoint's run (`run`: its args) trained on, while that data is there."""
    if labelled is not None and not labelled.exists():
        raise DatasetError(f"--labelled {labelled} does not exist")
    if labelled is not None and (labelled.suffix.lower() == ".zip" or detectable(labelled)
                                 or labelled.is_dir() and nested_datasets(labelled)):
        tree = open_data(labelled, "auto")
        return [image for image, _ in list_pairs(tree, "train")], f"split {tree.resolve('train')} of {labelled}"
    if labelled is not None:
        return [image for image, _ in find_images([str(labelled)], recursive=True)], f"the images of {labelled}"
    if not run:
        return [], "none (--labelled DIR names them)"
    data, split = run.get("data"), run.get("train_split", "train")
    try:
        tree = open_data(Path(data) if data else None, run.get("layout", "auto"), run.get("seed", 0),
                         run.get("val_fraction"))
        return [image for image, _ in list_pairs(tree, split)], f"split {split} of {data or 'the demo data'}"
    except DatasetError as e:
        return [], f"none: the checkpoint's --data {data} cannot be read ({one_line(e)}); --labelled DIR names them"


def select_images(paths: list[str], out: Path, select: int, recursive: bool = False,
                  labelled: list[Path] | None = None, workers: int = 0) -> dict:
    """Without a model (the first round: which images to label first): the `select` images that best cover the
    pool's thumbnails, the `labelled` ones counting as covered, linked into out/selected/ (their relative paths
    kept), and out/ranking.csv ordering every image."""
    found, labelled = find_images(paths, recursive), labelled or []
    files = [image for image, _ in found]
    known = thumbnails(labelled, workers) if labelled else None
    order = apart(coverage_order(thumbnails(files, workers), known), files, labelled)
    for pick in order[:select]:
        image, relative = found[pick.index]
        link_or_copy(image, out / "selected" / relative)
    ranking = write_ranking(out / RANKING, files, order, {}, [], labelled)
    print(f"linked the {min(select, len(files))} images that best cover the {len(files)} into {out / 'selected'}; "
          f"{ranking} orders them all by what {len(labelled)} labelled images leave uncovered (by thumbnails: "
          f"give --checkpoint to see them as a model does), {sum(p.beside is not None for p in order)} beside a "
          "labelled or earlier image of their sequence last")
    return {"selected": [str(files[p.index]) for p in order[:select]], "out": str(out), "ranking": str(ranking)}


ImageLike = str | Path | Image.Image | np.ndarray


def as_image(image: ImageLike) -> torch.Tensor:
    """uint8 RGB [3, H, W] from a file path (read as training reads files: the way up its EXIF tag says), a PIL
    image (turned the same way) or an HxWx3 (or HxW grey) uint8 array."""
    if isinstance(image, (str, Path)):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        image = np.asarray(displayed(image).convert("RGB"))
    array = np.asarray(image)
    array = np.repeat(array[..., None], 3, -1) if array.ndim == 2 else array
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
        raise DatasetError(f"an image array must be HxWx3 uint8 (RGB), not {array.shape} {array.dtype}")
    return torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1)  # a writable copy


@torch.no_grad()
def predict(
    model: nn.Module, images: ImageLike | list[ImageLike], *, probs: bool = False,
    size: tuple[int, int] | None | str = "model", options: InferenceOptions = InferenceOptions(), batch_size: int = 4,
) -> np.ndarray | list[np.ndarray]:
    """The class-index mask (HxW uint8) of an image, or a list of masks for a list of images, each at its image's
    own size; with probs=True the softmax probabilities (CxHxW float32) instead. Images are file paths, PIL images
    or HxWx3 uint8 RGB arrays. `size`: the (H, W) the model sees, "model" for the size it was trained at (as
    load_model sets it), or None for each image as it is.

        masks = predict(load_model("runs/x/best.pth"), ["a.jpg", "b.png"])"""
    single = not isinstance(images, (list, tuple))
    tensors = [as_image(image) for image in ([images] if single else images)]
    size = getattr(model, "size", None) if size == "model" else size
    device, outputs = device_of(model), [None] * len(tensors)
    model.eval()
    for batch in same_size_batches([size or tuple(t.shape[-2:]) for t in tensors], batch_size):
        x = torch.stack([resize_image(tensors[i], size) if size else tensors[i] for i in batch])
        logits = options.logits(model, model_input(x, model, device))
        for i, logit in zip(batch, logits):
            logit = to_size(logit, tuple(tensors[i].shape[-2:]))
            outputs[i] = (logit.softmax(0) if probs else logit.argmax(0).to(torch.uint8)).cpu().numpy()
    return outputs[0] if single else outputs


# ---- evaluating a model on a dataset: metrics, their interval, pictures ----------------------------------------------


def picture_writer(out: Path, dataset: SegmentationDataset, save_probs: bool, label_ids: bool) -> Callable:
    """evaluate()'s on_batch for --save-predictions (batches of one): each image's prediction files and its labels."""
    names = iter(Path(image.stem) for image, _ in dataset.pairs)
    ids = class_ids(dataset.class_map) if label_ids else None

    def on_batch(image: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        conf, pred = logits[0].softmax(0).max(0)
        write_prediction(
            out / next(names), image[0].permute(1, 2, 0).numpy(), pred.cpu().numpy(), dataset.class_map,
            conf.cpu().numpy() if save_probs else None, target[0].cpu().numpy(), ids,
        )

    return on_batch


def evaluate_dataset(
    model: nn.Module, dataset: SegmentationDataset, *, options: InferenceOptions = InferenceOptions(),
    batch_size: int = 4, workers: int = 0, bootstrap: int = 1000, seed: int = 0, pictures: Path | None = None,
    save_probs: bool = False, label_ids: bool = False,
) -> tuple[dict, torch.Tensor]:
    """The numbers `--json` writes for `model` on `dataset` (mIoU and its 95% bootstrap interval over the images,
    pixel accuracy, per-class IoU, precision, recall and share), and the per-image confusion matrices [N, C, C]
    that paired comparisons resample. With `pictures`, each image's prediction files are written there."""
    device = device_of(model)
    loader = DataLoader(dataset, batch_size=1 if pictures else batch_size, num_workers=workers, collate_fn=collate,
                        worker_init_fn=pixel_limit_for_workers())
    on_batch = picture_writer(pictures, dataset, save_probs, label_ids) if pictures else None
    result = evaluate(model, loader, None, device, dataset.class_map.num_classes, amp_dtype_for(options.amp, device),
                      options.tta, options.window, options.window_stride, on_batch)
    confusions = result.pop("confusions")
    result["reliability"] = result["reliability"].tolist()  # [C, bins, wrong/right] pixel counts
    result["miou_ci"] = interval(bootstrap_miou(confusions, resamples=bootstrap, seed=seed)[0])
    result.update(images=len(dataset), class_names=list(dataset.class_map.names))
    result["images_per_class"] = (confusions.sum(-1) > 0).sum(0).tolist()  # images whose ground truth holds it
    result["image_names"] = [image.name for image, _ in dataset.pairs]
    result["per_image_miou"] = iou_from_confusion(confusions)[1].tolist()
    return result, confusions


def evaluate_model(
    model: nn.Module, data: str | Path | None, *, split: str = "val", layout: str = "auto",
    val_fraction: float | None = None, size: tuple[int, int] | None | str = "model",
    options: InferenceOptions = InferenceOptions(), batch_size: int = 4, bootstrap: int = 1000, seed: int = 0,
) -> dict:
    """evaluate_dataset on a split of the data at `data` (a folder or an export's .zip, any layout; None: the demo
    data), its masks read with the model's own class map (load_model sets it), so that each class means what it
    meant in training; `size` as in predict. The dict is the one `evaluate.py --json` writes.

        report = evaluate_model(load_model("runs/x/best.pth"), "path/to/data", split="val")"""
    size = getattr(model, "size", None) if size == "model" else size
    transform = TransformConfig(size=size, train=False)
    data = Path(data) if data is not None else None
    dataset = build_dataset(data, layout, split, transform, model.class_map, seed, val_fraction=val_fraction)
    result, _ = evaluate_dataset(model, dataset, options=options, batch_size=batch_size, bootstrap=bootstrap, seed=seed)
    return {**result, "split": split}


# ---- the HTML report: where a model fails, on one page that opens from disk ------------------------------------------

REPORT_BEST = 4  # the best images shown beside the worst, for contrast
PAGE_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0;cursor:pointer;user-select:none}td:first-child,th:first-child{text-align:left}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #000;margin-right:6px;vertical-align:middle}
.na{color:#999}.figs img{max-width:48%;margin:4px}.case{margin:14px 0;padding:8px;border-top:1px solid #ddd}
.case img{height:170px;margin-right:6px;vertical-align:top}.muted{color:#666}"""
SORT_SCRIPT = """document.querySelectorAll('table.sortable th').forEach((th, col) =>
 th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = [...body.rows], up = th.dataset.dir !== 'up';
  const key = r => { const v = r.cells[col].dataset.v; return v === undefined ? r.cells[col].textContent : +v; };
  rows.sort((a, b) => { const x = key(a), y = key(b); if (Number.isNaN(x)) return 1; if (Number.isNaN(y)) return -1;
    return (x > y ? 1 : x < y ? -1 : 0) * (up ? 1 : -1); });
  th.dataset.dir = up ? 'up' : 'down'; rows.forEach(r => body.appendChild(r)); }));"""


def page(title: str, body: list[str]) -> str:
    """A whole HTML page with no outside resource: styles and the table-sorting script inline."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head>\n<body>\n" + "\n".join(body) + f"\n<script>{SORT_SCRIPT}</script>"
            "\n</body></html>\n")


def cell(value: float | None, digits: int = 4, percent: bool = False) -> str:
    """A sortable number cell; NaN or None is n/a (sorted last)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="na" data-v="NaN">n/a</td>'
    text = f"{value:.{digits - 2}%}" if percent else f"{value:.{digits}f}" if isinstance(value, float) else f"{value}"
    return f'<td data-v="{value!r}">{text}</td>'


def sortable_table(headers: list[str], rows: list[list[str]]) -> str:
    """Header names (escaped here) and rows of ready <td> cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>\n'
            + "\n".join(f"<tr>{''.join(r)}</tr>" for r in rows) + "\n</tbody></table>")


def swatch(colour: np.ndarray | tuple) -> str:
    return '<span class="sw" style="background:rgb({},{},{})"></span>'.format(*(int(c) for c in colour))


def mistakes(mat: np.ndarray, names: list[str], top: int = 3) -> list[str]:
    """`true -> predicted (share of the true class's pixels)` for the largest off-diagonal cells of a confusion
    matrix [C, C], most pixels first."""
    off = mat * (1 - np.eye(len(names), dtype=mat.dtype))
    order = np.argsort(off, axis=None)[::-1][:top]
    truth = mat.sum(1)
    return [f"{names[t]} → {names[p]} ({off[t, p] / truth[t]:.0%})" for t, p in zip(*np.unravel_index(order, off.shape))
            if off[t, p] > 0]


def gallery_case(model: nn.Module, dataset: SegmentationDataset, index: int, score: float, mat: np.ndarray,
                 folder: Path, options: InferenceOptions) -> str:
    """One image's four pictures (image, ground truth, prediction, errors), each with its legend, as HTML."""
    image, target = dataset[index]
    pred, target = predict(model, image.permute(1, 2, 0).numpy(), size=None, options=options), target.numpy()
    class_map, name = dataset.class_map, dataset.pairs[index][0].stem
    classes = lambda *masks: sorted(set().union(*(np.unique(m).tolist() for m in masks)) - {IGNORE_INDEX})  # noqa: E731
    entries = lambda cs: [(class_map.palette[c], class_map.names[c]) for c in cs]  # noqa: E731
    pictures = {
        "image": image.permute(1, 2, 0).numpy(),
        "truth": legend(colourize(target, class_map.palette), entries(classes(target))),
        "prediction": legend(colourize(pred, class_map.palette), entries(classes(pred))),
        "errors": legend(error_map(pred, target), [(c, n) for n, c in ERROR_COLOURS.items()]),
    }
    cells = []
    for kind, picture in pictures.items():
        Image.fromarray(picture).save(folder / f"{index:05d}_{kind}.png")
        cells.append(f'<img src="images/{index:05d}_{kind}.png" alt="{kind}" title="{kind}">')
    wrong = ", ".join(html.escape(m) for m in mistakes(mat, list(class_map.names))) or "none"
    miou = "n/a" if math.isnan(score) else f"{score:.4f}"
    return (f'<div class="case"><b>{html.escape(name)}</b> · image mIoU {miou} · most wrong: {wrong}<br>'
            + "".join(cells) + "</div>")


def report_plots(out: Path, result: dict, confusions: torch.Tensor, per_image: list[float]) -> list[str]:
    """The confusion matrix, the per-image mIoU histogram and IoU against pixel share, as PNGs; their <img>s."""
    names = result["class_names"]
    plot_confusion(confusions.sum(0), names, out / "confusion.png")
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    scores = [s for s in per_image if not math.isnan(s)]
    ax.hist(scores, bins=min(20, max(len(scores), 1)), range=(0, 1), color="#4c72b0")
    ax.set(xlabel="per-image mIoU", ylabel="images", title=f"Per-image mIoU ({len(scores)} images)")
    _save(fig, out / "per_image_miou.png")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    present = [i for i, share in enumerate(result["share"]) if share > 0]
    ax.scatter([result["share"][i] for i in present], [result["iou"][i] for i in present], color="#dd8452")
    for i in present:
        ax.annotate(names[i], (result["share"][i], result["iou"][i]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="share of ground-truth pixels (log)", ylabel="IoU", ylim=(0, 1), title="Where rare classes stand")
    _save(fig, out / "iou_vs_share.png")
    return [f'<img src="{n}" alt="{n}">' for n in ("confusion.png", "per_image_miou.png", "iou_vs_share.png")]


def mistaken_for(row: np.ndarray, c: int, names: list[str], top: int = 2) -> str:
    """The classes a class's pixels are most often predicted as, with their share: `Road 12%, Car 3%`."""
    off = row.astype(np.float64).copy()
    off[c] = 0
    picks = [p for p in np.argsort(off)[::-1][:top] if off[p] > 0]
    return ", ".join(f"{names[p]} {off[p] / max(row.sum(), 1):.0%}" for p in picks)


def class_rows(result: dict, palette: np.ndarray, confusions: torch.Tensor) -> list[list[str]]:
    """The per-class table: the --json numbers, n/a for a class absent from the split's ground truth."""
    total, names = confusions.sum(0).numpy(), result["class_names"]
    rows = []
    for c, name in enumerate(names):
        absent = result["share"][c] == 0
        rows.append([f"<td>{swatch(palette[c])}{html.escape(name)}</td>",
                     cell(math.nan if absent else result["iou"][c]), cell(result["precision"][c]),
                     cell(math.nan if absent else result["recall"][c]), cell(result["share"][c], percent=True),
                     cell(result["images_per_class"][c]),
                     f"<td>{html.escape(mistaken_for(total[c], c, names)) or '—'}</td>"])
    return rows


def write_report(out: Path, model: nn.Module, dataset: SegmentationDataset, result: dict, confusions: torch.Tensor,
                 context: dict[str, str], options: InferenceOptions = InferenceOptions(), images: int = 12) -> Path:
    """OUT/index.html: the headline, the per-class table, the confusion matrix, the per-image mIoU histogram, the
    worst images (and a few of the best) with their pictures, IoU against pixel share. Every number is one of
    `result`'s (the --json numbers); every name from the data is escaped."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    scores = result["per_image_miou"]
    order = sorted(range(len(scores)), key=lambda i: (math.isnan(scores[i]), scores[i]))
    worst = order[:images]
    best = [i for i in reversed(order) if i not in worst and not math.isnan(scores[i])][:REPORT_BEST]
    case = lambda i: gallery_case(model, dataset, i, scores[i], confusions[i].numpy(), out / "images", options)  # noqa: E731
    lo, hi = result["miou_ci"]
    headers = ["class", "IoU", "precision", "recall", "share of pixels", "images", "most often predicted as"]
    body = [
        f"<h1>Where the model fails: {html.escape(context.get('checkpoint', 'model'))}</h1>",
        f"<p><b>mIoU {result['miou']:.4f}</b> (95% CI [{lo:.4f}, {hi:.4f}], bootstrap over the images) · "
        f"pixel accuracy {result['pixel_acc']:.4f}</p>",
        '<p class="muted">' + " · ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in context.items())
        + "</p>",
        "<h2>Per class</h2>", sortable_table(headers, class_rows(result, dataset.class_map.palette, confusions)),
        "<h2>Confusion, per-image mIoU, rare classes</h2>",
        '<div class="figs">' + "".join(report_plots(out, result, confusions, scores)) + "</div>",
        f"<h2>The {len(worst)} worst images by mIoU</h2>",
        '<p class="muted">each: the image, its ground truth, the prediction, and the errors</p>',
        *(case(i) for i in worst),
        f"<h2>The {len(best)} best, for contrast</h2>", *(case(i) for i in best),
    ]
    (out / "index.html").write_text(page(f"Report: {context.get('checkpoint', 'model')}", body))
    return out / "index.html"


# ---- ONNX export: write the file, check it against PyTorch with ONNX Runtime, time both ------------------------------

ONNX_OPSET = 18
ONNX_AGREEMENT = 0.999  # share of pixels whose predicted class must agree with PyTorch's
# the largest logit difference allowed: 1e-3, or 1e-5 of the largest logit where logits pass 100 (float32 keeps about
# 7 digits, and an untrained DeepLabV2's logits reach 1e5)
ONNX_TOLERANCE, ONNX_RELATIVE = 1e-3, 1e-5


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


def onnx_runtime() -> object:
    """onnxruntime, once onnx and onnxscript (which torch.onnx.export needs) are known to be installed too."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ModelError(f"ONNX needs the package {e.name}: pip install -r requirements.txt") from None
    return onnxruntime


class OnnxModel(nn.Module):
    """An exported model run by ONNX Runtime on the CPU, in place of the PyTorch model: normalised images
    [B, 3, H, W] in, logits [B, C, H, W] out (a module without parameters, so evaluation and prediction take it)."""

    def __init__(self, path: Path):
        super().__init__()
        ort = onnx_runtime()
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # a missing, truncated or foreign file: name it, not ONNX Runtime's internals
            raise ModelError(f"--onnx {path} cannot be loaded by ONNX Runtime: {one_line(e)}") from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {"image": x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int], metadata: dict[str, str]) -> None:
    """Write `model` (eval mode, CPU, contiguous) to `path` with dynamic batch, height and width, and `metadata`
    (class map, input size and normalisation, so the file can be used without the checkpoint)."""
    onnx_runtime()
    try:
        path.open("wb").close()  # an unwritable path fails here, in one line, before minutes of export
    except OSError as e:
        raise ModelError(f"--export-onnx {path}: cannot write it ({e.strerror})") from None
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    sample = torch.randn(2, 3, *size)
    try:
        program = torch.onnx.export(
            model, (sample,), dynamo=True, opset_version=ONNX_OPSET, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: batch, 2: height, 3: width},), verbose=False,
        )
        import onnx

        proto = program.model_proto
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(path))
    except Exception as e:
        path.unlink(missing_ok=True)
        raise ModelError(f"--export-onnx {path}: the export failed ({type(e).__name__}: {one_line(e)})") from None


def check_batches(images: list[torch.Tensor], size: tuple[int, int] | None, seed: int = 0) -> list[torch.Tensor]:
    """Two normalised batches of the uint8 `images` (random input without any) at two sizes, `size` (or the first
    image's) and about 3/4 of it, odd-sized: what an export is checked on."""
    first = size or (tuple(images[0].shape[-2:]) if images else (256, 256))
    second = (3 * first[0] // 4 + 1, 3 * first[1] // 4 + 1)
    if not images:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randn(2, 3, *hw, generator=generator) for hw in (first, second)]
    return [normalize(torch.stack([resize_image(image, hw) for image in images])) for hw in (first, second)]


def compare_onnx(model: nn.Module, onnx_model: OnnxModel, batches: list[torch.Tensor], source: str) -> dict:
    """The largest logit difference, the largest logit and the share of pixels of the same class, over `batches`."""
    worst, scale, agree, pixels = 0.0, 0.0, 0, 0
    for x in batches:
        ours, theirs = model(x), onnx_model(x)
        diff, same = float((ours - theirs).abs().max()), int((ours.argmax(1) == theirs.argmax(1)).sum())
        worst, scale = max(worst, diff), max(scale, float(ours.abs().max()))
        agree, pixels = agree + same, pixels + ours[:, 0].numel()
        print(f"  {source}, batch {x.shape[0]} at {x.shape[2]}x{x.shape[3]}: largest logit difference "
              f"{diff:.2e} (logits up to {float(ours.abs().max()):.2f}), classes agree on "
              f"{same / ours[:, 0].numel():.4%} of pixels")
    return {"max_abs_diff": worst, "max_abs_logit": scale, "agreement": agree / pixels}


@torch.no_grad()
def export_model(model: nn.Module, path: Path, batches: list[torch.Tensor], source: str, metadata: dict) -> dict:
    """Write `model` (eval mode, CPU, contiguous) as ONNX, check ONNX Runtime's logits against PyTorch's on
    `batches` (removing the file if they disagree), and print both latencies for one image."""
    start = time.perf_counter()
    export_onnx(model, path, tuple(batches[0].shape[-2:]), metadata)
    print(f"exported {metadata.get('arch', 'the model')} to {path} (opset {ONNX_OPSET}, dynamic batch, height and "
          f"width) in {time.perf_counter() - start:.1f} s; checked with ONNX Runtime on:")
    onnx_model = OnnxModel(path)
    result = compare_onnx(model, onnx_model, batches, source)
    tolerance = max(ONNX_TOLERANCE, ONNX_RELATIVE * result["max_abs_logit"])
    if result["agreement"] < ONNX_AGREEMENT or result["max_abs_diff"] > tolerance:
        path.unlink(missing_ok=True)
        raise ModelError(f"--export-onnx: ONNX Runtime disagrees with PyTorch (classes agree on "
                         f"{result['agreement']:.4%} of pixels, largest logit difference {result['max_abs_diff']:.2e} "
                         f"where {tolerance:.1e} is allowed); {path} removed")
    one, cpu = batches[0][:1], torch.device("cpu")
    result["eager_ms"] = 1000 * time_steps(lambda: model(one), cpu, 1, 5, 10.0)["seconds"]
    result["onnxruntime_ms"] = 1000 * time_steps(lambda: onnx_model(one), cpu, 1, 5, 10.0)["seconds"]
    print(f"agreement {result['agreement']:.4%} (at least {ONNX_AGREEMENT:.1%}), largest logit difference "
          f"{result['max_abs_diff']:.2e} (at most {tolerance:.1e}): passed")
    print(f"latency of one {one.shape[2]}x{one.shape[3]} image on the CPU (median of up to 5): PyTorch eager "
          f"{result['eager_ms']:.1f} ms | ONNX Runtime {result['onnxruntime_ms']:.1f} ms")
    return result


# ---- run comparison: log.csv of several runs -> summary.md and plots -------------------------------------------------


def format_iou(names: list[str], iou: list[float]) -> str:
    return " | ".join(f"{name} {'n/a' if math.isnan(v) else f'{v:.4f}'}" for name, v in zip(names, iou))


def read_run(run_dir: Path) -> dict:
    """A run folder's log.csv as columns of floats (NaN where a cell is empty), plus run.json when present."""
    log = run_dir / "log.csv"
    try:
        with open(log, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except OSError as e:
        raise DatasetError(f"cannot read {log}: {e.strerror}") from None
    if not rows:
        raise DatasetError(f"{log} holds no epochs")
    for line, row in enumerate(rows, 2):
        try:
            if None in row or None in row.values():  # csv.DictReader's marks of a row too long or too short
                cells = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                raise ValueError(f"{cells} cells where the header has {len(header)}")
            cells = {name: float(value) if value else math.nan for name, value in row.items()}
        except ValueError as e:
            raise DatasetError(f"{log}, line {line}: not a row as train_deeplab.py writes it ({e})") from None
        rows[line - 2] = cells
    columns = {name: np.array([r[name] for r in rows]) for name in rows[0]}
    meta, _ = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else ({}, b"")
    return {"name": run_dir.name, "columns": columns, "meta": meta if isinstance(meta, dict) else {}}


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


SUMMARY_FORMATS = ("", ".4f", ".0f", ".4f", ".4f", ".4f", ".1f", ".1f", "")  # then per-class IoU, .4f


def summary_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """One row per run: best val mIoU and its epoch, final mIoUs, pixel acc and per-class val IoU at the best
    epoch, run time and trainable parameters (the values; summary_markdown and the HTML page format them)."""
    names = class_names_of(runs)
    header = ["run", "best val mIoU", "best epoch", "final train mIoU", "final val mIoU", "pixel acc"]
    header += ["total time (s)", "mean epoch time (s)", "trainable params", *names]
    rows = []
    for run in runs:
        best = best_epoch_row(run)
        runtime = run["columns"].get("Runtime", np.array([math.nan]))
        rows.append([run["name"], _value(run, "val_mIoU", best), _value(run, "epoch", best),
                     _value(run, "train_mIoU", -1), _value(run, "val_mIoU", -1), _value(run, "pixel_acc", best),
                     float(runtime.sum()), float(runtime.mean()), run["meta"].get("trainable_params", "n/a"),
                     *(_value(run, f"class_{c}_val", best) for c in range(len(names)))])
    return header, rows


def summary_markdown(runs: list[dict]) -> str:
    header, rows = summary_rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    formats = SUMMARY_FORMATS + (".4f",) * (len(header) - len(SUMMARY_FORMATS))
    for row in rows:
        cells = [format(v, f) if f and isinstance(v, float) else str(v) for v, f in zip(row, formats)]
        lines.append("| " + " | ".join(cells).replace("nan", "n/a") + " |")
    return "\n".join(lines) + "\n"


def differing_args(runs: list[dict]) -> list[dict]:
    """For each run, its arguments whose values differ from the first run's (where it wrote them)."""
    first = runs[0]["meta"].get("args", {})
    ignored = ("out", "resume")
    return [{k: v for k, v in run["meta"].get("args", {}).items() if k not in ignored and first.get(k) != v}
            for run in runs]


def paired_comparisons(run_dirs: list[Path], runs: list[dict], bootstrap: int, seed: int) -> list[dict | None]:
    """Each run's best.pth against the first run's on the first run's validation split (a paired bootstrap over
    the images), where every run has a best.pth and was trained on the same data; else an empty list."""
    data_keys = ("data", "layout", "val_fraction", "val_split")
    args = [run["meta"].get("args", {}) for run in runs]
    same = all(all(a.get(k) == args[0].get(k) for k in data_keys) for a in args)
    if not same or not all((Path(d) / "best.pth").is_file() for d in run_dirs) or not args[0]:
        return []
    models = [load_model(Path(d) / "best.pth") for d in run_dirs]
    data, size = args[0].get("data"), models[0].size
    split, transform = args[0].get("val_split", "val"), TransformConfig(size=size, train=False)
    dataset = build_dataset(Path(data) if data else None, args[0].get("layout", "auto"), split, transform,
                            models[0].class_map, args[0].get("seed", 0), val_fraction=args[0].get("val_fraction"))
    confusions = [evaluate_dataset(m, dataset, bootstrap=1)[1] for m in models]
    return [None] + [compare_verdict(confusions[0], c, bootstrap, seed) for c in confusions[1:]]


def compare_html(report: Path, runs: list[dict], plots: list[str], comparisons: list[dict | None]) -> Path:
    """REPORT/index.html: the summary table (sortable; with the paired bootstrap against the first run where there
    is one), every plot, and each run's arguments that differ from the first run's."""
    header, rows = summary_rows(runs)
    formats = SUMMARY_FORMATS + (".4f",) * (len(header) - len(SUMMARY_FORMATS))
    table = []
    for k, row in enumerate(rows):
        cells = [f"<td>{html.escape(str(row[0]))}</td>"] + [
            cell(v, int(f[1]) if f else 4) if isinstance(v, float) else cell(v)
            for v, f in zip(row[1:], formats[1:])]
        verdict = comparisons[k] if comparisons else None
        if comparisons:  # beside the best val mIoU: the paired difference to the first run and its interval
            cells[2:2] = [cell(verdict["diff"]) if verdict else "<td>(the reference)</td>",
                          f"<td>[{verdict['ci'][0]:+.4f}, {verdict['ci'][1]:+.4f}]</td>" if verdict else "<td></td>"]
        table.append(cells)
    if comparisons:
        header = header[:2] + ["mIoU - first run's (paired, first run's val split)", "95% CI"] + header[2:]
    changed = [f"<li><b>{html.escape(run['name'])}</b>: " + (", ".join(
        f"{html.escape(k)}={html.escape(json.dumps(v))}" for k, v in diff.items()) or (
        "the reference" if k == 0 else "the same arguments")) + "</li>"
        for k, (run, diff) in enumerate(zip(runs, differing_args(runs)))]
    body = ["<h1>Comparing runs</h1>", '<div style="overflow-x:auto">' + sortable_table(header, table) + "</div>",
            "<h2>What differs from the first run</h2>", "<ul>" + "".join(changed) + "</ul>",
            "<h2>Curves and bars</h2>", '<div class="figs">' + "".join(
                f'<img src="{html.escape(p)}" alt="{html.escape(p)}">' for p in plots) + "</div>"]
    (report / "index.html").write_text(page("Comparing runs", body))
    return report / "index.html"


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


def _runtime(run: dict) -> np.ndarray:
    return run["columns"].get("Runtime", np.array([math.nan]))


LR_TITLE = "Learning rate at the start of each epoch"


def _train_and_val(axes: np.ndarray, runs: list[dict], metric: str, ylabel: str) -> None:
    """train_<metric> of every run on the left, val_<metric> on the right."""
    for ax, column in zip(axes.flat, (f"train_{metric}", f"val_{metric}")):
        _curves(ax, runs, column, column, ylabel)


def _loss_per_run(axes: np.ndarray, runs: list[dict]) -> None:
    """One panel per run with its train and val loss; spare panels blank."""
    for ax, run in zip(axes.flat, runs):
        for column in ("train_loss", "val_loss"):
            if column in run["columns"]:
                ax.plot(run["columns"]["epoch"], run["columns"][column], marker=".", label=column)
        ax.set(title=run["name"], xlabel="epoch", ylabel="loss")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")


def _per_class_bars(ax, runs: list[dict], names: list[str]) -> None:
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [_value(run, f"class_{c}_val", best_epoch_row(run)) for c in range(len(names))]
        ax.bar(np.arange(len(names)) + i * width, values, width, label=run["name"])
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    ax.set(title="Per-class val IoU at each run's best epoch", ylabel="IoU")
    ax.legend(fontsize=8)


def _time_bars(axes: np.ndarray, runs: list[dict]) -> None:
    """Total and mean epoch time per run; runs whose log has no Runtime are said to show no bar."""
    totals, labels = [_runtime(run) for run in runs], [run["name"] for run in runs]
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


def _tradeoff(ax, runs: list[dict]) -> None:
    for run in runs:
        point = (_runtime(run).sum(), _value(run, "val_mIoU", best_epoch_row(run)))
        ax.scatter(*point, s=60)
        ax.annotate(run["name"], point, fontsize=8)
    ax.set(title="Time vs best val mIoU", xlabel="total time (s)", ylabel="best val mIoU")
    ax.grid(True, linestyle="--", alpha=0.5)


def compare_runs(run_dirs: list[Path], report: Path, bootstrap: int = 1000, seed: int = 0) -> list[Path]:
    """Write summary.md, the comparison plots of several runs and index.html into `report`; return the files
    written."""
    runs = [read_run(Path(d)) for d in run_dirs]
    report.mkdir(parents=True, exist_ok=True)
    (report / "summary.md").write_text(summary_markdown(runs))
    names = class_names_of(runs)
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    plots = [  # file, subplot rows and columns, figure size, what draws on the axes
        ("lr_schedule.png", 1, 1, (8, 5), lambda a: _curves(a[0, 0], runs, "lr", LR_TITLE, "lr")),
        ("loss_per_run.png", rows, cols, (5 * cols, 3.5 * rows), lambda a: _loss_per_run(a, runs)),
        ("loss_all.png", 1, 2, (14, 5), lambda a: _train_and_val(a, runs, "loss", "loss")),
        ("miou.png", 1, 2, (14, 5), lambda a: _train_and_val(a, runs, "mIoU", "mIoU")),
        ("per_class_iou.png", 1, 1, (max(8, 1.2 * len(names)), 5), lambda a: _per_class_bars(a[0, 0], runs, names)),
        ("time.png", 1, 2, (14, 5), lambda a: _time_bars(a, runs)),
        ("tradeoff.png", 1, 1, (8, 5), lambda a: _tradeoff(a[0, 0], runs)),
    ]
    for name, nrows, ncols, size, draw in plots:
        fig = Figure(figsize=size)
        draw(fig.subplots(nrows, ncols, squeeze=False))
        _save(fig, report / name)
    comparisons = paired_comparisons([Path(d) for d in run_dirs], runs, bootstrap, seed)
    index = compare_html(report, runs, [name for name, *_ in plots], comparisons)
    return [report / "summary.md", *(report / name for name, *_ in plots), index]


# ---- benchmarks: parameters, GMACs, latency, throughput --------------------------------------------------------------


def benchmark(
    model: nn.Module, size: tuple[int, int], batch_size: int, device: torch.device, amp_dtype: torch.dtype | None,
    warmup: int, runs: int, limit: float | None = None,
) -> dict:
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
            "timed": (latency["runs"], per_batch["runs"])}


# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the model-FLOPs utilisation
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def train_benchmark(
    model: nn.Module, size: tuple[int, int], batch_size: int, device: torch.device, amp_dtype: torch.dtype | None,
    warmup: int, runs: int, limit: float | None = None,
) -> dict:
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


@dataclass(frozen=True)
class Timing:
    """How a benchmark times: `warmup` untimed passes, then at most `runs` timed ones, stopped once they have taken
    `limit` seconds (None: never)."""

    warmup: int
    runs: int
    limit: float | None

    @classmethod
    def for_device(
        cls, device: torch.device, warmup: int | None = None, runs: int | None = None, limit: float | None = None
    ) -> "Timing":
        """What is left unset: on CUDA 3 warm-up passes and 10 timed runs (a stable median); on the CPU 1 and 3,
        timing stopped after 30 s, so the slowest arch at 512x1024 takes about a minute. A limit of 0: never."""
        cuda = device.type == "cuda"
        return cls((3 if cuda else 1) if warmup is None else warmup, (10 if cuda else 3) if runs is None else runs,
                   (None if cuda else 30.0) if limit is None else limit or None)


def cost_models(
    checkpoint: Path | None, arch: str = "all", num_classes: int | None = None, output_stride: int | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """(arch, model) to measure: the checkpoint's model, or `arch` (all: each arch in turn, built when needed)."""
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        yield state["args"]["arch"], model_from_checkpoint(state, checkpoint)
        return
    for name in ARCHS if arch == "all" else (arch,):
        stride = output_stride if "resnet" in name and name.startswith("deeplabv3") else None
        yield name, build_model(name, num_classes or 19, output_stride=stride)


def format_name(model: nn.Module) -> str:
    return "channels_last" if memory_format_of(model) == torch.channels_last else "contiguous"


def print_train_row(
    model: nn.Module, arch: str, size: tuple[int, int], macs: float, batch_size: int, device: torch.device,
    amp_dtype: torch.dtype | None, timing: Timing, why: str,
) -> None:
    """Training throughput in the memory format the run would use, and why (on the CPU: both formats raced side by
    side just now, the race a run then reuses); on CUDA also the achieved TFLOP/s (a training step is counted as
    3x the forward FLOPs) beside the GPU's dense bf16 peak, which gives the model-FLOPs utilisation."""
    settings = (size, batch_size, device, amp_dtype, timing.warmup, timing.runs, timing.limit)
    result, chosen = train_benchmark(model, *settings), format_name(model)
    where = f"{device}, dtype {amp_dtype or torch.float32}, batch {batch_size}, torch {torch.__version__}"
    print(f"train step of {arch} at {size[0]}x{size[1]} on {where}, median of {result['timed']} after {timing.warmup}")
    print(f"memory format {chosen}: {why}")
    line = f"train: {result['images_per_s']:.2f} images/s ({chosen}) | peak memory {result['peak_memory_gib']:.2f} GiB"
    if device.type == "cuda":
        achieved = 3 * 2 * macs * 1e9 * result["images_per_s"] / 1e12
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        line += f" | {achieved:.1f} TFLOP/s achieved"
        line += f" of {peak:.0f} peak bf16 (MFU {achieved / peak:.1%})" if peak else " (peak of this GPU unknown)"
    print(line)


def print_layout_rows(models: Iterator[tuple[str, nn.Module]], size: tuple[int, int], batch_size: int,
                      runs: int) -> None:
    """--benchmark --train --runtimes: each model's CPU training step in contiguous and channels_last memory, raced
    side by side (the formats taking turns, step by step), and the format `--channels-last auto` then trains in:
    the race is cached, so a run on this machine, torch and input uses it."""
    print(f"training steps (forward, cross-entropy, backward) at {batch_size}x{size[0]}x{size[1]} on the CPU "
          f"({torch.get_num_threads()} threads), images/s, the fastest of {runs} steps per format, taking turns; "
          f"torch {torch.__version__}")
    print("| arch | contiguous | channels_last | channels_last / contiguous | `--channels-last auto` |")
    print("|---|---|---|---|---|")
    for arch, model in models:
        race, _ = measured_layout(model, arch, (batch_size, *size), train=True, fresh=True, steps=runs)
        faster = "channels_last" if race["channels_last"] > race["contiguous"] else "contiguous"
        print(f"| {arch} | {race['contiguous']:.2f} | {race['channels_last']:.2f} | "
              f"{race['channels_last'] / race['contiguous']:.2f} | {faster} |")


def print_cost_rows(
    models: Iterator[tuple[str, nn.Module]], size: tuple[int, int], batch_size: int, device: torch.device,
    amp: str = "off", channels_last: str = "auto", compile: bool = False, timing: Timing | None = None,
    train: bool = False,
) -> None:
    """The second study's results columns, a row per model: params (an aux head's apart: only training uses it),
    GMACs, latency, throughput, and how many runs each timing took; with `train`, training steps instead."""
    amp_dtype, timing = amp_dtype_for(amp, device), timing or Timing.for_device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if not train:
        limit = f", each timing stopped after {timing.limit:g} s" if timing.limit else ""
        print(f"measured on {device} ({where}), torch {torch.__version__}, dtype {amp_dtype or torch.float32}, "
              f"channels_last {channels_last}, compile {compile}, median of up to {timing.runs} runs after "
              f"{timing.warmup}{limit}")
        print("| arch | input | trainable params | total params | GMACs | GMACs (conv) | latency (ms, batch 1) | "
              "images/s (batch) | runs timed | memory format |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for arch, model in models:
        (trainable, total), aux = count_params(model), aux_params(model)
        macs, conv_macs = (n / 1e9 for n in count_macs(model, size))
        shape = (batch_size if train else 1, *size)
        faster, why = layout_choice(channels_last, arch, device, model.train(train).to(device), shape, train,
                                    fresh=train, steps=timing.runs)
        model = model.eval().to(memory_format=torch.channels_last if faster else torch.contiguous_format)
        model = torch.compile(model) if compile else model
        if train:
            print_train_row(model, arch, size, conv_macs, batch_size, device, amp_dtype, timing, why)
            continue
        result = benchmark(model, size, batch_size, device, amp_dtype, timing.warmup, timing.runs, timing.limit)
        print(f"| {arch} | {size[0]}x{size[1]} | {trainable:,}{f' (+{aux:,} aux head)' if aux else ''} | {total:,} | "
              f"{macs:.2f} | {conv_macs:.2f} | {result['latency_ms']:.2f} | {result['images_per_s']:.2f} "
              f"({batch_size}) | {' / '.join(map(str, result['timed']))} | {format_name(model)} |")


@torch.no_grad()
def print_runtime_rows(models: Iterator[tuple[str, nn.Module]], size: tuple[int, int], timing: Timing) -> None:
    """Batch-1 CPU latency of each model in eager PyTorch (contiguous and channels_last) and in ONNX Runtime
    (exported to a temporary file, as --export-onnx exports)."""
    cpu = torch.device("cpu")
    print(f"batch-1 latency (ms) at {size[0]}x{size[1]} on the CPU ({torch.get_num_threads()} threads), median of "
          f"up to {timing.runs} runs after {timing.warmup}; torch {torch.__version__}, "
          f"onnxruntime {onnx_runtime().__version__}")
    print("| arch | eager, contiguous | eager, channels_last | ONNX Runtime |")
    print("|---|---|---|---|")
    median = lambda step: time_steps(step, cpu, timing.warmup, timing.runs, timing.limit)["seconds"]  # noqa: E731
    for arch, model in models:
        model, x, row = model.eval(), torch.randn(1, 3, *size), []
        for memory_format in (torch.contiguous_format, torch.channels_last):
            model, x = model.to(memory_format=memory_format), x.contiguous(memory_format=memory_format)
            row.append(median(partial(model, x)))
        model, x = model.to(memory_format=torch.contiguous_format), x.contiguous()
        with tempfile.TemporaryDirectory() as folder:
            export_onnx(model, Path(folder) / "model.onnx", size, {})
            row.append(median(partial(OnnxModel(Path(folder) / "model.onnx"), x)))
        print(f"| {arch} | " + " | ".join(f"{1000 * seconds:.1f}" for seconds in row) + " |")


# ---- command line: each mode a thin layer over the functions above --------------------------------------------------

REPORT, PREDICTIONS = Path("report"), Path("predictions")  # where --compare and --predict write without a flag


def eval_size(size: list | None, trained: list | None) -> tuple[int, int] | None:
    """--size H W, or `--size off` (each image as it is), or else the size the checkpoint was trained at."""
    if size == ["off"]:
        return None
    if size and "off" in size:
        raise DatasetError(f"--size takes H W or off, got {' '.join(map(str, size))}")
    return within_pixel_limit(hw_pair(size) if size else hw_pair(trained), "--size")


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    return InferenceOptions(args.tta, hw_pair(args.sliding_window, "--sliding-window"), args.stride or 0, args.amp)


def data_source(args: argparse.Namespace, run: dict) -> tuple[Path | None, str, float | None]:
    """The data, layout and validation hold-out of --data and its flags, else those the checkpoint's run used."""
    if args.data is not None:
        return args.data, args.layout, args.val_fraction
    return (Path(run["data"]) if run.get("data") else None), run.get("layout", "auto"), run.get("val_fraction")


def print_metrics(result: dict, bootstrap: int) -> None:
    lo, hi = result["miou_ci"]
    print(f"mIoU {result['miou']:.4f} (95% CI [{lo:.4f}, {hi:.4f}], {bootstrap} bootstrap resamples of the images)")
    print(f"pixel acc {result['pixel_acc']:.4f}")
    print(f"  {'class':<20} {'IoU':>7} {'share':>7} {'precision':>9} {'recall':>7}")
    for row in zip(result["class_names"], result["iou"], result["share"], result["precision"], result["recall"]):
        print(f"  {row[0]:<20} " + " ".join(f"{v:>{w}.4f}" for v, w in zip(row[1:], (7, 7, 9, 7))))


def compare_command(args: argparse.Namespace, dataset: SegmentationDataset, result: dict, confusions: torch.Tensor
                    ) -> dict:
    """--compare-checkpoint: the paired bootstrap of the second model against the first, on the same images."""
    other = load_checkpoint(args.compare_checkpoint)
    if other["num_classes"] != len(result["class_names"]):
        raise ModelError(f"--compare-checkpoint has {other['num_classes']} classes, --checkpoint "
                         f"{len(result['class_names'])}")
    model = model_with_classes(other, args.compare_checkpoint, args.device, args.channels_last)
    theirs, their_confusions = evaluate_dataset(model, dataset, options=inference_options(args),
                                                batch_size=args.batch_size, workers=args.workers,
                                                bootstrap=args.bootstrap, seed=args.seed)
    comparison = compare_verdict(confusions, their_confusions, args.bootstrap, args.seed)
    comparison.update(a=str(args.checkpoint), b=str(args.compare_checkpoint), miou_b=theirs["miou"],
                      iou_b=theirs["iou"])
    print(f"A = {args.checkpoint} (mIoU {result['miou']:.4f})")
    print(f"B = {args.compare_checkpoint} (mIoU {theirs['miou']:.4f})")
    print(f"{comparison['verdict']} (B ahead in {comparison['share_above_zero']:.1%} of resamples)")
    return comparison


def predict_command(args: argparse.Namespace, model: nn.Module, class_map: ClassMap, size: tuple[int, int] | None,
                    checkpoint: dict | None = None) -> dict:
    out = args.out or args.save_predictions or PREDICTIONS
    labelled, source = labelled_frames(args.labelled, (checkpoint or {}).get("args", {}))
    print(f"labelled already: {len(labelled)} frames, {source}")
    return predict_images(model, args.predict, out, class_map, size=size, recursive=args.recursive,
                          options=inference_options(args), batch_size=args.batch_size, workers=args.workers,
                          save_probs=args.save_probs, label_ids=args.label_ids,
                          scorer=labelling_score(checkpoint, class_map.num_classes), select=args.select,
                          labelled=labelled, pre_label=args.pre_label, image_url=args.image_url,
                          model_version=str(args.checkpoint or args.onnx))


def select_command(args: argparse.Namespace) -> dict:
    """--predict with --select and no model: the images to label first, by their thumbnails."""
    if args.pre_label:
        raise ModelError("--pre-label needs a model's predictions: give --checkpoint (or --onnx)")
    labelled, source = labelled_frames(args.labelled, {})
    print(f"labelled already: {len(labelled)} images, {source}")
    return select_images(args.predict, args.out or PREDICTIONS, args.select, args.recursive, labelled, args.workers)


def evaluate_command(args: argparse.Namespace) -> dict:
    """--checkpoint: metrics, bootstrap interval, optional paired comparison, pictures and JSON; or the predictions
    of --predict images. With --onnx, ONNX Runtime runs the exported model and no PyTorch model is built."""
    checkpoint = load_checkpoint(args.checkpoint)
    run, class_map = checkpoint["args"], checkpoint_class_map(checkpoint)
    model = OnnxModel(args.onnx) if args.onnx else model_with_classes(
        checkpoint, args.checkpoint, args.device, args.channels_last)
    size = eval_size(args.size, run.get("size"))
    if args.predict:
        return predict_command(args, model, class_map, size, checkpoint)
    data, layout, val_fraction = data_source(args, run)
    transform = TransformConfig(size=size, train=False)
    dataset = build_dataset(data, layout, args.split, transform, class_map, args.seed, val_fraction=val_fraction)
    result, confusions = evaluate_dataset(
        model, dataset, options=inference_options(args), batch_size=args.batch_size, workers=args.workers,
        bootstrap=args.bootstrap, seed=args.seed, pictures=args.save_predictions, save_probs=args.save_probs,
        label_ids=args.label_ids,
    )
    result.update(checkpoint=str(args.checkpoint), split=args.split)
    runtime = f", run by ONNX Runtime from {args.onnx}" if args.onnx else ""
    print(f"{args.checkpoint} on split {args.split!r} ({len(dataset)} images, tta {args.tta}{runtime})")
    print_metrics(result, args.bootstrap)
    if args.compare_checkpoint:
        result["comparison"] = compare_command(args, dataset, result, confusions)
    if args.confusion:
        plot_confusion(confusions.sum(0), result["class_names"], args.confusion)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.report:
        context = {"checkpoint": str(args.checkpoint), "data": str(data or "the demo data"), "split": args.split,
                   "images": len(dataset), "size": "as stored" if size is None else f"{size[0]}x{size[1]}",
                   "tta": args.tta, "sliding window": " ".join(map(str, args.sliding_window or [])) or "off"}
        index = write_report(args.report, model, dataset, result, confusions, context, inference_options(args),
                             args.report_images)
        print(f"wrote {index}")
    return result


def predict_onnx_command(args: argparse.Namespace) -> dict:
    """--predict with --onnx and no checkpoint: the class map and input size come from the file's metadata."""
    model = OnnxModel(args.onnx)
    if "class_map" not in model.metadata:
        raise ModelError(f"--onnx {args.onnx} has no class map in its metadata: pass the --checkpoint it came from")
    size = eval_size(args.size, json.loads(model.metadata["size"]))
    return predict_command(args, model, ClassMap.from_dict(json.loads(model.metadata["class_map"])), size)


def export_images(args: argparse.Namespace, run: dict, class_map: ClassMap) -> tuple[list[torch.Tensor], str]:
    """Up to two images to check an export on, and where they come from: the --predict images, else the
    checkpoint's validation split, else none (random input)."""
    try:
        if args.predict:
            return [read_image(path) for path, _ in find_images(args.predict, args.recursive)[:2]], "--predict images"
        data, layout, val_fraction = data_source(args, run)
        transform = TransformConfig(train=False)
        dataset = build_dataset(data, layout, args.split, transform, class_map, args.seed, val_fraction=val_fraction)
        return [dataset[i][0] for i in range(min(2, len(dataset)))], f"images of split {args.split!r}"
    except DatasetError as e:
        if args.predict:
            raise
        return [], f"random input ({one_line(e)})"


def export_command(args: argparse.Namespace) -> dict:
    """--export-onnx: the checkpoint's model (CPU, contiguous), checked on two batches at two sizes."""
    checkpoint = load_checkpoint(args.checkpoint)
    model, run = model_from_checkpoint(checkpoint, args.checkpoint).eval(), checkpoint["args"]
    class_map, size = checkpoint_class_map(checkpoint), eval_size(args.size, run.get("size"))
    images, source = export_images(args, run, class_map)
    batches = check_batches(images, size, args.seed)
    metadata = {"class_map": json.dumps(class_map.to_dict()), "size": json.dumps(size), "arch": run["arch"],
                "input": "float32 RGB [B, 3, H, W], (pixel / 255 - mean) / std",
                "mean": json.dumps(IMAGENET_MEAN), "std": json.dumps(IMAGENET_STD)}
    return export_model(model, args.export_onnx, batches, source, metadata)


def benchmark_command(args: argparse.Namespace) -> None:
    """--benchmark: the cost table (or, with --train, training steps; with --runtimes, CPU runtimes)."""
    size, device = hw_pair(args.size) or (512, 1024), torch.device("cpu" if args.runtimes else args.device)
    models = cost_models(args.checkpoint, args.arch, args.num_classes, args.output_stride)
    timing = Timing.for_device(device, args.warmup, args.runs, args.time_limit)
    if args.runtimes and args.train:
        print_layout_rows(models, size, args.batch_size, timing.runs)
    elif args.runtimes:
        print_runtime_rows(models, size, timing)
    else:
        print_cost_rows(models, size, args.batch_size, device, args.amp, args.channels_last, args.compile, timing,
                        args.train)


def check_outputs(args: argparse.Namespace) -> None:
    """Every path the command is to write, checked before any work: a folder where a folder goes, a file where a
    file goes, and somewhere this process may write."""
    folders = {"--save-predictions": args.save_predictions, "--report": args.report or (args.compare and REPORT),
               "--out": args.predict and (args.out or args.save_predictions or PREDICTIONS)}
    for flag, path in folders.items():
        if path:
            writable_folder(path, flag)
    for flag, path in {"--json": args.json, "--confusion": args.confusion, "--export-onnx": args.export_onnx}.items():
        if path:
            writable_file(path, flag)


def main(args: argparse.Namespace) -> None:
    set_pixel_limit(args.max_pixels)
    try:
        check_outputs(args)
        if args.compare:
            report = args.report or REPORT
            files = compare_runs(args.compare, report, args.bootstrap, args.seed)
            print(f"wrote {len(files)} files to {report}: {', '.join(f.name for f in files)}")
        elif args.benchmark:
            benchmark_command(args)
        elif args.checkpoint is not None and args.export_onnx is not None:
            export_command(args)
        elif args.checkpoint is not None:
            evaluate_command(args)
        elif args.predict and args.onnx:
            predict_onnx_command(args)
        elif args.predict and args.select:
            select_command(args)
        else:
            sys.exit("error: give --checkpoint (evaluate, --predict, --export-onnx), --benchmark (cost table), "
                     "--compare RUN... (report), --predict with --onnx, or --predict with --select (which images "
                     "to label first)")
    except (DatasetError, ModelError) as e:
        sys.exit(f"error: {one_line(e)}")
    except OSError as e:  # a write that failed after the checks above passed: a full disk, a folder removed
        sys.exit(f"error: {one_line(cannot_write(Path(e.filename or '.'), e))}")
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        sys.exit("error: out of memory; try a smaller --batch-size or --size, or --sliding-window")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


def pre_label_formats(text: str) -> tuple[str, ...]:
    formats = tuple(PRE_LABEL_WRITERS) if text == "all" else tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in PRE_LABEL_WRITERS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown format {', '.join(unknown) or repr(text)}: choose from "
                                         f"{', '.join(PRE_LABEL_WRITERS)} or all")
    return tuple(dict.fromkeys(formats))


def size_value(text: str) -> int | str:
    return text if text == "off" else POSITIVE_INT(text)


def add_inference_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--size", type=size_value, nargs="+", action=HeightWidth, default=None,
                       help="resize to H W, or off (default: as trained)")
    group.add_argument("--batch-size", type=POSITIVE_INT, default=4)
    group.add_argument("--workers", type=COUNT, default=2)
    group.add_argument("--device", type=device_name, default=DEFAULT_DEVICE)
    group.add_argument("--amp", default="off", choices=("bf16", "fp16", "off"), help="mixed precision on CUDA")
    group.add_argument("--tta", default="none", choices=tuple(TTA_SCALES),
                       help="flip, or ms: scales 0.75/1/1.25 + flip")
    group.add_argument("--sliding-window", type=POSITIVE_INT, nargs="+", action=HeightWidth, default=None,
                       metavar="H W", help="predict by windows")
    group.add_argument("--stride", type=POSITIVE_INT, default=None,
                       help="sliding-window stride (default: half a window)")
    group.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                       help="memory format (auto: channels_last where measured faster for the arch and device)")


def add_output_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--bootstrap", type=COUNT, default=1000, help="resamples for the 95%% CI of mIoU")
    group.add_argument("--compare-checkpoint", type=Path, default=None, help="paired bootstrap against this model")
    group.add_argument("--confusion", type=Path, default=None, help="write the row-normalised confusion matrix PNG")
    group.add_argument("--save-predictions", type=Path, default=None, metavar="DIR",
                       help="write each image's prediction files here")
    group.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    group.add_argument("--predict", nargs="+", default=None, metavar="PATH",
                       help="predict images: files, folders or glob patterns")
    group.add_argument("--out", type=Path, default=None, help="--predict: output folder (default: predictions)")
    group.add_argument("--recursive", action="store_true", help="--predict: images in subfolders too")
    group.add_argument("--save-probs", action="store_true", help="also write NAME_conf.png, the max softmax")
    group.add_argument("--pre-label", type=pre_label_formats, default=(), metavar="FORMATS",
                       help=f"--predict: also write the predictions for the tools to import, in OUT/FORMAT/: any of "
                       f"{','.join(PRE_LABEL_WRITERS)} (comma-separated), or all")
    group.add_argument("--select", type=POSITIVE_INT, default=None, metavar="N",
                       help="--predict: write the files of the N images that best cover what is not labelled yet, "
                       "no two next to each other in a sequence (the first N of ranking.csv) only; without a model, "
                       "link them into OUT/selected/")
    group.add_argument("--labelled", type=Path, default=None, metavar="DIR",
                       help="--predict: the images already labelled, which count as covered: a dataset (its "
                       "training split) or a folder of images (default: the checkpoint's training split)")
    group.add_argument("--image-url", default=LABEL_STUDIO_LOCAL_FILES, metavar="PREFIX",
                       help="--pre-label label-studio: each task's image URL is PREFIX then images/NAME (default: "
                       "Label Studio's local files, under LOCAL_FILES_DOCUMENT_ROOT=OUT/label-studio)")
    group.add_argument("--label-ids", action="store_true", help="NAME.png in the masks' own ids (Cityscapes labelIds)")
    group.add_argument("--export-onnx", type=Path, default=None, metavar="OUT", help="export to ONNX and check it")
    group.add_argument("--onnx", type=Path, default=None, help="predict or evaluate with this file in ONNX Runtime")


def add_benchmark_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--benchmark", action="store_true", help="print the cost row: params, GMACs, latency")
    group.add_argument("--train", action="store_true", help="--benchmark training steps instead of inference")
    group.add_argument("--arch", default="deeplabv2_resnet101", choices=(*ARCHS, "all"),
                       help="model for --benchmark (all: each)")
    group.add_argument("--output-stride", type=int, default=None, choices=(8, 16),
                       help="--benchmark: of the ResNet DeepLabV3/V3+ archs")
    group.add_argument("--compile", action="store_true", help="--benchmark a torch.compile'd model")
    group.add_argument("--runtimes", action="store_true",
                       help="--benchmark CPU latency: eager, channels_last, ONNX Runtime")
    group.add_argument("--warmup", type=COUNT, default=None, help="--benchmark passes before timing (CUDA 3, CPU 1)")
    group.add_argument("--runs", type=POSITIVE_INT, default=None,
                       help="--benchmark timed passes at most (CUDA 10, CPU 3)")
    group.add_argument("--time-limit", type=NON_NEGATIVE, default=None, metavar="S",
                       help="stop timing after S s (CPU 30; 0: never)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Evaluate, compare and benchmark DeepLab models", add_help=add_help)
    parser.add_argument("--checkpoint", type=Path, default=None, help="best.pth or last.pth of a run")
    data = parser.add_argument_group("data")
    add_data_args(data)
    data.add_argument("--split", default="val", help="split to evaluate")
    add_inference_args(parser.add_argument_group("inference"))
    add_output_args(parser.add_argument_group("outputs: metrics, pictures, predictions, ONNX"))
    comparison = parser.add_argument_group("comparing runs")
    comparison.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RUN",
                            help="run folders to compare")
    report = parser.add_argument_group("the HTML report")
    report.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write DIR/index.html: with --checkpoint where the model fails, with --compare the runs "
                        "side by side (default for --compare: report)")
    report.add_argument("--report-images", type=COUNT, default=12, metavar="N",
                        help="--report: the N worst images by mIoU (and a few of the best)")
    add_benchmark_args(parser.add_argument_group("benchmarks"))
    return parser

if __name__ == "__main__":
    main(get_args_parser().parse_args())
