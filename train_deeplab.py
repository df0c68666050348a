"""Train a DeepLab model for semantic segmentation.

    python train_deeplab.py                                   # demo data, MobileNetV3 DeepLabV3, CPU-friendly
    python train_deeplab.py --data ROOT --arch deeplabv2_resnet101 --lr 1e-4 --loss ce:0.5,lovasz:0.5

Writes OUT/best.pth, OUT/last.pth and OUT/log.csv (one row per epoch).
"""

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from annotations import link_or_copy, pixel_limit_for_workers, set_pixel_limit
from dataset import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    WEIGHT_RULES,
    ArgumentParser,
    ClassMap,
    ClassOptions,
    DatasetError,
    EpochSampler,
    SegmentationDataset,
    SplitStats,
    add_data_args,
    add_transform_args,
    cannot_write,
    check_trainable,
    collate,
    hw_pair,
    image_size,
    number,
    one_line,
    open_data,
    out_of_memory,
    split_dataset,
    split_statistics,
    transform_from_args,
    writable_folder,
)
from evaluate import (
    ConfusionMatrix,
    InferenceOptions,
    amp_dtype_for,
    autocast,
    colourize,
    evaluate,
    format_iou,
    predict,
)
from losses import LossSpecError, build_loss
from models import (
    ARCHS,
    DEFAULT_DEVICE,
    ModelError,
    atrous_rates_of,
    aux_params,
    backbone_frozen,
    build_model,
    count_params,
    device_name,
    freeze_backbone,
    layout_choice,
    load_checkpoint,
    load_init,
    load_weights,
    logit_stride,
    model_input,
    output_stride_of,
    param_groups,
    set_train_mode,
    unwrap,
)

RUNS = Path("runs")  # where runs go without --out, and where fine-tuning looks for the newest one


# ---- the recipe: each run's defaults, by arch and by how the model starts --------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """The defaults of one situation. lr and weight decay are given per optimizer, (sgd, adamw), so that
    `--optimizer` alone also picks the lr and weight decay that go with it."""

    optimizer: str
    lr: tuple[float, float]
    weight_decay: tuple[float, float]
    loss: str
    head_lr_mult: float


OPTIMIZERS = ("sgd", "adamw")


STARTS = {"scratch": "from scratch", "imagenet": "from ImageNet weights", "init": "from --init",
          "checkpoint": "from a checkpoint"}


# A flag given on the command line always wins; resolve_defaults fills in the rest from this table, and the --help
# of --optimizer, --lr, --weight-decay, --loss and --head-lr-mult is written from it. Momentum is 0.9 throughout.
FINE_TUNE = Recipe("sgd", (0.01, 1e-3), (5e-4, 0.01), "ce", 1.0)


RECIPES = {  # (arch family, start): optimizer, lr (sgd, adamw), weight decay (sgd, adamw), loss, head lr multiplier
    # DeepLabV3/V3+ from scratch: AdamW with CE + Lovász beat SGD (0.05) with CE by +0.051 mIoU over six CamVid
    # seeds, in less time (BENCHMARKS.md, "CamVid from scratch"): Lovász-softmax optimises the IoU of every class
    # present, so rare classes that CE alone leaves at 0 IoU get learned. SGD from scratch needs its higher lr
    ("deeplabv3", "scratch"): Recipe("adamw", (0.05, 1e-3), (5e-4, 0.01), "ce:0.5,lovasz:0.5", 1.0),
    # from ImageNet weights, --init weights or a checkpoint: SGD at 0.01 with CE, torchvision's reference recipe
    # (its 1e-4 weight decay raised to DeepLab's 5e-4); fine-tuning keeps what the features already know
    ("deeplabv3", "imagenet"): FINE_TUNE,
    ("deeplabv3", "init"): FINE_TUNE,
    ("deeplabv3", "checkpoint"): FINE_TUNE,
    # DeepLabV2 however it starts: the paper's recipe, SGD at 2.5e-4 with the ASPP head at 10x, CE (the Cityscapes
    # study, README "DeepLabV2 fidelity")
    **{("deeplabv2", start): Recipe("sgd", (2.5e-4, 2.5e-4), (5e-4, 0.01), "ce", 10.0) for start in STARTS},
}


def arch_family(arch: str) -> str:
    return "deeplabv2" if arch.startswith("deeplabv2") else "deeplabv3"


def start_of(pretrained: bool, init: Path | None, checkpoint: dict | None) -> str:
    """How a run's model starts: a checkpoint's weights, --init weights, ImageNet weights, or nothing."""
    if checkpoint is not None:
        return "checkpoint"
    return "init" if init is not None else "imagenet" if pretrained else "scratch"


def recipe_help(setting: str) -> str:
    """`default: ...` for one setting, every value the table holds for it, with the situations that get it."""
    parts = []
    for family, label in (("deeplabv3", "DeepLabV3/V3+"), ("deeplabv2", "DeepLabV2")):
        by_value: dict[str, list[str]] = {}
        for (row_family, start), recipe in RECIPES.items():
            value = getattr(recipe, setting)
            if isinstance(value, tuple):
                value = ", ".join(f"{name} {v:g}" for name, v in zip(OPTIMIZERS, value))
            if row_family == family:
                by_value.setdefault(f"{value:g}" if isinstance(value, float) else value, []).append(STARTS[start])
        whens = [f"{value} {' or '.join(starts)}" for value, starts in by_value.items()]
        parts.append(f"{label}: {'; '.join(whens) if len(whens) > 1 else next(iter(by_value))}")
    return f"default by arch and start (train_deeplab.RECIPES): {'; '.join(parts)}"


def resolve_defaults(args: argparse.Namespace, checkpoint: dict | None = None) -> str:
    """Fill in the defaults that depend on other flags, so the printed args and the checkpoint show real values:
    the recipe's (RECIPES) for the arch and the start, for each setting the command line left out. Returns the
    line that says what the run got, and from where."""
    if args.pretrained is None:  # the demo, --init and fine-tuning runs must not download anything
        args.pretrained = args.data is not None and args.init is None and checkpoint is None
    family, start = arch_family(args.arch), start_of(args.pretrained, args.init, checkpoint)
    given = [f"--{name.replace('_', '-')}" for name in ("optimizer", "lr", "weight_decay", "loss", "head_lr_mult")
             if getattr(args, name) is not None]
    recipe = RECIPES[(family, start)]
    args.optimizer = args.optimizer or recipe.optimizer
    which = OPTIMIZERS.index(args.optimizer)
    args.lr = recipe.lr[which] if args.lr is None else args.lr
    args.weight_decay = recipe.weight_decay[which] if args.weight_decay is None else args.weight_decay
    args.loss = args.loss or recipe.loss
    args.head_lr_mult = recipe.head_lr_mult if args.head_lr_mult is None else args.head_lr_mult
    args.output_stride = output_stride_of(args.arch, args.output_stride)
    rates = atrous_rates_of(args.arch, args.output_stride, args.atrous_rates)
    args.atrous_rates = list(rates) if rates else None  # a list, as JSON and the checkpoint keep it
    stride = logit_stride(args.arch, args.output_stride)
    if args.downsample_gt is not None and args.downsample_gt != stride:
        raise ModelError(
            f"--downsample-gt {args.downsample_gt} does not match the stride of the logits of {args.arch} at output "
            f"stride {args.output_stride} ({stride}): the loss is computed at the logits' own resolution"
        )
    if args.ema and (args.freeze_backbone or args.freeze_at_epoch):  # batchnorm_for_average would recompute them
        raise ModelError("--ema gives the average BatchNorm statistics of its own, which a frozen backbone keeps as "
                         "they are: drop --ema, or --freeze-backbone / --freeze-at-epoch")
    if args.aux_loss and args.arch == "deeplabv2_resnet101":
        raise ModelError("--aux-loss needs a DeepLabV3 or DeepLabV3+ arch (DeepLabV2 has no aux head)")
    return (f"recipe: optimizer {args.optimizer}, lr {args.lr:g}, weight decay {args.weight_decay:g}, loss "
            f"{args.loss}, head lr x{args.head_lr_mult:g}: train_deeplab.RECIPES for {family} {STARTS[start]}"
            + (f", but {', '.join(given)} as given" if given else ""))


# ---- schedule: the poly learning rate with warmup, and what changes from which epoch on ------------------------------


def poly_lr_factor(it: int, max_iters: int, power: float, warmup_steps: int = 0) -> float:
    """(1 - it / max_iters)^power, ramped up linearly over the first `warmup_steps` iterations."""
    factor = (1 - min(it, max_iters) / max_iters) ** power
    if it < warmup_steps:
        factor *= (it + 1) / warmup_steps
    return factor


def _epoch_and_value(part: str, flag: str) -> tuple[int, str]:
    epoch, _, value = part.strip().partition(":")
    if not epoch.isdigit() or not value:
        raise LossSpecError(f"invalid {flag} {part!r}: expected EPOCH:VALUE, e.g. {flag} 28:1.2")
    return int(epoch), value


def parse_power_changes(spec: str | None) -> dict[int, float]:
    """--poly-power-at `28:1.2,46:2.0` -> {28: 1.2, 46: 2.0}: the poly power from each epoch on."""
    changes = {}
    for part in spec.split(",") if spec else []:
        epoch, value = _epoch_and_value(part, "--poly-power-at")
        try:
            changes[epoch] = NON_NEGATIVE(value)
        except argparse.ArgumentTypeError as e:
            raise LossSpecError(f"invalid --poly-power-at {part!r}: {e}") from None
    return changes


def parse_loss_changes(items: list[str] | None) -> dict[int, str]:
    """--loss-at `46:ce:0.5,lovasz:0.5` (repeatable) -> {46: 'ce:0.5,lovasz:0.5'}: the loss from that epoch on."""
    return dict(_epoch_and_value(item, "--loss-at") for item in items or [])


def value_at(changes: dict, epoch: int, default: object) -> object:
    """The value in force at `epoch`: the last change made at or before it."""
    started = [e for e in changes if e <= epoch]
    return changes[max(started)] if started else default


def build_optimizer(
    args: argparse.Namespace, model: nn.Module, iters_per_epoch: int, power_changes: dict[int, float]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD or AdamW over the backbone and head groups, and the per-iteration poly schedule with warmup, whose
    power follows --poly-power-at."""
    groups = param_groups(model, args.lr, args.head_lr_mult, args.lr_backbone)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    max_iters = args.epochs * iters_per_epoch

    def factor(it: int) -> float:
        power = value_at(power_changes, it // iters_per_epoch + 1, args.poly_power)
        return poly_lr_factor(it, max_iters, power, args.warmup_steps)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- building a run: processes and device, data, loss, model, optimiser ----------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join the process group: nccl on CUDA, gloo on
    the CPU; each process drives the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(args.device)
    rank, cuda = int(os.environ["RANK"]), args.device.startswith("cuda")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def setup_device(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device), with the device's speed settings."""
    rank, world, device = setup_distributed(args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:  # early eval-mode passes of a model trained from scratch produce denormals, 10x slower on x86 CPUs
        torch.set_flush_denormal(True)
    return rank, world, device


def build_loaders(
    args: argparse.Namespace, rank: int, world: int, classes: ClassOptions | ClassMap
) -> tuple[SegmentationDataset, DataLoader, DataLoader]:
    """Training batches sharded over the processes (order and augmentation fixed by seed and epoch alone), and
    validation images split between them without the padding a DistributedSampler would add. The class map is
    resolved on the training split (or given) and shared by the validation split."""
    tree = open_data(args.data, args.layout, args.seed, args.val_fraction)  # read once, for both splits
    train_set = split_dataset(
        tree, args.train_split, transform_from_args(args, train=True), classes, args.seed, args.cache
    )
    val_set = split_dataset(
        tree, args.val_split, transform_from_args(args, train=False), train_set.class_map, args.seed, args.cache
    )
    per_rank = len(train_set) // world
    if args.arch.startswith("deeplabv3") and min(args.batch_size, per_rank) < 2:
        raise ModelError(
            "DeepLabV3 needs --batch-size 2 or more (its ASPP pooling branch has BatchNorm over the batch)"
        )
    pin = args.device.startswith("cuda")
    common = dict(num_workers=args.workers, pin_memory=pin, collate_fn=collate, persistent_workers=args.workers > 0,
                  worker_init_fn=pixel_limit_for_workers())
    # loaders draw their workers' base seeds from their own generator, not from the global one that dropout uses:
    # otherwise when a loader (re)starts would change the dropout masks, and a resumed run would differ
    common["generator"] = torch.Generator().manual_seed(args.seed)
    shards = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=EpochSampler(shards),
        drop_last=per_rank >= args.batch_size,  # a last batch of one breaks BatchNorm
        **common,
    )
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=range(rank, len(val_set), world), **common)
    return train_set, train_loader, val_loader


def check_training_data(args: argparse.Namespace, train_set: SegmentationDataset, val_set: SegmentationDataset,
                        say: Callable) -> SplitStats:
    """Count every pixel of the training and validation masks once, before the first epoch: refuse data that would
    train wrongly (at most one class present, binary masks read with 255 as ignore, unreadable masks, a validation
    split with no labelled pixel, whose mIoU is nan and which never saves a best.pth), and warn in one line each
    about classes that never appear, values outside the class table and lossy masks."""
    class_map = train_set.class_map
    for line in train_set.about:
        say(line)
    why = f" ({train_set.why})" if train_set.why else ""
    say(f"masks: {class_map.encoding}, {class_map.num_classes} classes from {class_map.source}{why}")
    where = f"split {args.train_split} of {args.data or 'the demo data'}"
    stats = split_statistics(train_set.pairs, class_map, f"checking {args.train_split} masks")
    for warning in check_trainable(stats, class_map, where, train_set.pairs):
        say(f"warning: {warning}")
    val = split_statistics(val_set.pairs, class_map, f"checking {args.val_split} masks")
    where = f"split {args.val_split} of {args.data or 'the demo data'}"
    if val.unreadable:
        raise DatasetError(val.unreadable_line(where))
    if not val.pixels.any():
        raise DatasetError(f"every pixel of the {len(val_set)} masks of {where} is ignored ({val.ignored:,} pixels): "
                           "there is nothing to validate on, so no epoch could be judged and no best.pth saved")
    train_set.reported_unknown = True  # said once here, not again by every DataLoader worker
    return stats


def step_size(args: argparse.Namespace, train_set: SegmentationDataset) -> tuple[int, int]:
    """The (H, W) of a training batch: the crop, else the resize, else the first training image's own size."""
    return hw_pair(args.crop, "--crop") or hw_pair(args.size) or image_size(train_set.pairs[0][0])[::-1]


def load_class_weights(
    args: argparse.Namespace, names: tuple[str, ...], pixels: np.ndarray, say: Callable
) -> torch.Tensor | None:
    """--class-weights: none, auto (median frequency balancing of the training split's `pixels` per class), enet
    (ENet's 1 / ln(1.02 + frequency) of them), or a file of numbers."""
    if args.class_weights in (None, "none"):
        return None
    if args.class_weights in WEIGHT_RULES:
        weigh, rule = WEIGHT_RULES[args.class_weights]
        weights = weigh(pixels)
        say(f"class weights ({args.class_weights}: {rule}):")
    else:
        path = Path(args.class_weights)
        try:
            weights = [float(v) for v in path.read_text().replace(",", " ").split()]
        except (OSError, ValueError) as e:
            raise DatasetError(f"--class-weights file {path} cannot be read as numbers ({e})") from None
        if len(weights) != len(names):
            raise DatasetError(f"--class-weights file {path} has {len(weights)} numbers for {len(names)} classes")
        say(f"class weights (from {path}):")
    say("  " + " | ".join(f"{n} {w:.4f}" for n, w in zip(names, weights)))
    return torch.tensor(weights, dtype=torch.float32)


def build_network(
    args: argparse.Namespace, checkpoint: dict | None, resumed: dict | None, num_classes: int,
    device: torch.device, world: int, say: Callable, shape: tuple[int, int, int],
) -> tuple[nn.Module, nn.Module]:
    """The model (new, or with a checkpoint's weights), frozen and initialised as the flags say, on the device in
    the memory format that is faster for training batches of `shape` (batch, H, W); and the module that runs the
    steps (DDP and torch.compile wrap it; checkpoints save the model itself)."""
    source = resumed or checkpoint
    if source is not None and source["num_classes"] != num_classes:
        raise ModelError(f"checkpoint has {source['num_classes']} classes but the data has {num_classes}")
    pretrained = args.pretrained and source is None
    model = build_model(args.arch, num_classes, pretrained, args.output_stride, args.aux_loss > 0, args.atrous_rates)
    if source is not None:
        load_weights(model, source, args.resume or args.checkpoint)
        say(f"Loaded checkpoint of epoch {source['epoch']} (best val mIoU {source['best_miou']:.4f})")
    if args.init and resumed is None:
        say(load_init(model, args.init))
    if args.freeze_backbone:
        freeze_backbone(model)
    # raced before SyncBatchNorm, whose collectives the processes' races would not call alike
    faster, why = layout_choice(args.channels_last, args.arch, device, model.to(device), shape, train=True)
    if world > 1:  # every process in one format, channels_last only where every process raced it faster
        faster = all_processes_true(torch.tensor(faster, device=device))
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(memory_format=torch.channels_last if faster else torch.contiguous_format)
    say(f"memory format {'channels_last' if faster else 'contiguous'}: {why}")
    net = model
    if world > 1:  # a backbone frozen mid-run stops producing gradients, which DDP must be told to expect
        ids = [device.index] if device.type == "cuda" else None
        net = DDP(model, device_ids=ids, find_unused_parameters=args.freeze_at_epoch is not None)
    if args.compile:
        net = torch.compile(net)
    return model, net


def weight_average(model: nn.Module, epochs: float, iters_per_epoch: int) -> AveragedModel:
    """An exponential moving average of the model's weights (--ema), updated after every step, whose time constant
    is `epochs` epochs: decay = 1 - 1 / (epochs * iters_per_epoch), so a step's weights count for 1/e as much that
    many epochs later. Validation, checkpoints and exports get the average (Polyak averaging; timm's and YOLO's
    model EMA), with BatchNorm statistics of its own (batchnorm_for_average)."""
    decay = 1 - 1 / max(epochs * iters_per_epoch, 1)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def batchnorm_for_average(averaged: AveragedModel, loader: DataLoader, device: torch.device) -> None:
    """The average's BatchNorm statistics recomputed over one pass of the training batches (SWA's update_bn,
    Izmailov et al. 2018): the trained model's statistics, or their own average, do not fit averaged weights, which
    score far below the weights they average without statistics of their own. The random state is put back after
    the pass's dropout, so that training goes on exactly as it would without --ema."""
    images = (model_input(image, averaged.module, device) for image, _ in loader)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        update_bn(images, averaged.module)


def aux_note(model: nn.Module) -> str:
    """The aux head's parameters, reported apart: only training uses them."""
    return f" (+ aux head {aux_params(model)}, training only)" if aux_params(model) else ""


def open_tensorboard(out: Path) -> object:
    """A SummaryWriter into OUT/tensorboard. tensorboard is optional, so without it one line says how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ModelError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"))


@dataclass
class Run:
    """One training run: its data, model, optimisation state and where it writes. Under torchrun every process
    holds one; process 0 alone prints and writes."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path
    train_set: SegmentationDataset
    train_loader: DataLoader
    val_loader: DataLoader
    make_loss: Callable[[str], nn.Module]
    model: nn.Module  # the module itself, which the optimiser trains
    net: nn.Module  # what runs the steps: the model, or its DDP / torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    loss_changes: dict[int, str]
    averaged: AveragedModel | None = None  # --ema: the weights' moving average, validated and saved as "model"
    writer: object | None = None  # TensorBoard's SummaryWriter (--tensorboard, process 0)
    best_miou: float = -math.inf
    since_best: int = 0
    first_epoch: int = 1

    def say(self, *message: object) -> None:
        if self.rank == 0:
            print(*message)

    @property
    def class_map(self) -> ClassMap:
        return self.train_set.class_map

    @property
    def scored(self) -> nn.Module:
        """The model that is validated and saved as the checkpoint's "model": the moving average under --ema."""
        return self.model if self.averaged is None else self.averaged.module


def build_run(args: argparse.Namespace, checkpoint: dict | None, resumed: dict | None) -> Run:
    """Data (checked before the first epoch), loss, model (new, from a checkpoint, or resumed) and optimiser."""
    recipe = resolve_defaults(args, checkpoint or resumed)
    set_pixel_limit(args.max_pixels)
    rank, world, device = setup_device(args)
    say = print if rank == 0 else lambda *a, **k: None
    say(args)
    say(recipe if resumed is None else "recipe: the resumed run's own, as its checkpoint holds them")
    seed_everything(args.seed)
    out = args.out = Path(args.out or RUNS / f"{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    if resumed is None:
        check_out(out)
    power_changes, loss_changes = parse_power_changes(args.poly_power_at), parse_loss_changes(args.loss_at)
    # a resumed run reads its masks exactly as before; every other run resolves its flags against the masks
    resumed_map = resumed.get("class_map") if resumed else None
    classes = ClassMap.from_dict(resumed_map) if resumed_map else ClassOptions.from_args(args)
    train_set, train_loader, val_loader = build_loaders(args, rank, world, classes)
    stats = check_training_data(args, train_set, val_loader.dataset, say)
    class_map = train_set.class_map
    weights = load_class_weights(args, class_map.names, stats.pixels, say)
    make_loss = lambda spec: build_loss(spec, class_map.num_classes, class_weights=weights).to(device)  # noqa: E731
    for spec in [args.loss, *loss_changes.values()]:  # a typo in a later phase's loss fails now, not hours later
        make_loss(spec)
    shape = (min(args.batch_size, len(train_set)), *step_size(args, train_set))
    model, net = build_network(args, checkpoint, resumed, class_map.num_classes, device, world, say, shape)
    optimizer, scheduler = build_optimizer(args, model, len(train_loader), power_changes)
    averaged = weight_average(model, args.ema, len(train_loader)) if args.ema else None
    amp_dtype = amp_dtype_for(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    writer = open_tensorboard(out) if args.tensorboard and rank == 0 else None
    return Run(writer=writer, args=args, rank=rank, world=world, device=device, out=out, train_set=train_set,
               train_loader=train_loader, val_loader=val_loader, make_loss=make_loss, model=model, net=net,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, loss_changes=loss_changes,
               averaged=averaged)


# ---- the run folder: log.csv, run.json and checkpoints ---------------------------------------------------------------


def plain_args(args: argparse.Namespace) -> dict:
    """args as plain Python values, so a checkpoint loads with torch.load(weights_only=True)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def check_out(out: Path) -> None:
    """Before any work: never overwrite a run (a log or a checkpoint there is refused, saying how to go on), and
    `out` must be a folder this process can write into."""
    held = [name for name in ("log.csv", "last.pth", "best.pth") if (out / name).exists()]
    if (out / "last.pth").exists():
        raise DatasetError(f"--out {out} already holds a run ({', '.join(held)}); continue it with --resume "
                           f"{out / 'last.pth'}, or choose another --out")
    if held:
        raise DatasetError(f"--out {out} holds {' and '.join(held)} of an earlier run but no last.pth to resume "
                           "from; choose another --out, or move those files away to start again there")
    writable_folder(out, "--out")


def write_run_info(out: Path, args: argparse.Namespace, class_names: list[str], model: nn.Module) -> None:
    """run.json: what `evaluate.py --compare` needs besides log.csv (class names, parameter counts)."""
    trainable, total = count_params(model)
    info = {"class_names": class_names, "trainable_params": trainable, "total_params": total,
            "aux_params": aux_params(model), "args": plain_args(args)}
    try:
        (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    except OSError as e:
        raise cannot_write(out / "run.json", e) from None


def csv_header(num_classes: int) -> list[str]:
    return (
        ["epoch", "lr", "train_loss", "val_loss", "train_mIoU", "val_mIoU", "pixel_acc"]
        + [f"class_{c}_train" for c in range(num_classes)]
        + [f"class_{c}_val" for c in range(num_classes)]
        + ["Runtime", "data_wait"]
    )


def log_row(epoch: int, lr: float, train_m: dict, val_m: dict, runtime: float) -> list[str]:
    metrics = [train_m["loss"], val_m["loss"], train_m["miou"], val_m["miou"], val_m["pixel_acc"]]
    row = [lr, *metrics, *train_m["iou"], *val_m["iou"]]
    return [str(epoch), *(f"{v:.6g}" for v in row), f"{runtime:.2f}", f"{train_m['data_wait']:.4f}"]


def append_log(log: Path, row: list[str], num_classes: int) -> None:
    """An epoch's row, written after its checkpoint (which holds the row too), and the header with the first."""
    try:
        with open(log, "a", newline="") as f:
            if f.tell() == 0:
                csv.writer(f).writerow(csv_header(num_classes))
            csv.writer(f).writerow(row)
    except OSError as e:
        raise cannot_write(log, e) from None


def restore_log(log: Path, resumed: dict, num_classes: int) -> None:
    """log.csv as of a resumed checkpoint's epoch: rows of later epochs (whose checkpoint was never written) and a
    row a kill cut short are dropped, and the checkpoint's own row is put back where a kill came between the
    checkpoint and its row."""
    header, epoch = csv_header(num_classes), resumed["epoch"]
    try:
        with open(log, newline="") as f:
            rows = [r for r in csv.reader(f) if len(r) == len(header) and r[0].isdigit()]
    except FileNotFoundError:
        rows = []
    kept = [r for r in rows if int(r[0]) < epoch] + ([resumed["log_row"]] if "log_row" in resumed else
                                                      [r for r in rows if int(r[0]) == epoch])
    tmp = log.with_name(log.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *kept])
        os.replace(tmp, log)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise cannot_write(log, e) from None


def start_log(run: Run, resumed: dict | None) -> None:
    """run.json (and, resumed, the log as of the checkpoint's epoch); the log itself starts with the first row."""
    if run.rank != 0:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    write_run_info(run.out, run.args, list(run.class_map.names), run.model)
    if resumed is not None:
        restore_log(run.out / "log.csv", resumed, run.class_map.num_classes)


def write_checkpoints(state: dict, out: Path, best: bool) -> None:
    """OUT/last.pth, and OUT/best.pth when `best`, so that a kill at any instant leaves both recoverable: the state
    is written once to a temporary file, which becomes best.pth first (a hard link, or a copy), then last.pth (a
    rename). Killed before last.pth, the run resumes from the epoch before and repeats this one, while best.pth
    is this epoch's or the one before's, never neither. A failed write (a full disk) removes the temporary files
    and leaves the previous checkpoints whole."""
    last, best_path = out / "last.pth", out / "best.pth"
    temps = (out / "last.pth.tmp", out / "best.pth.tmp")
    try:
        for tmp in temps:  # a kill's leftovers: one may be a hard link of the other
            tmp.unlink(missing_ok=True)
        torch.save(state, temps[0])
        if best:
            link_or_copy(temps[0], temps[1])
            os.replace(temps[1], best_path)
        os.replace(temps[0], last)
    except BaseException as e:  # a full disk, or Ctrl-C: no temporary file is left behind
        error = cannot_write(best_path if best and not best_path.exists() else last, e)
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise error from None
        raise


def rng_state(device: torch.device) -> dict:
    """The random-number state that a resumed run needs (dropout; data augmentation is seeded per sample)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def save(run: Run, epoch: int, improved: bool, val_reliability: torch.Tensor, row: list[str]) -> None:
    """last.pth every epoch, best.pth when val mIoU improved: state dicts, `args`, `epoch`, the class map, the
    epoch's log.csv row, and its validation reliability counts (evaluate.reliability_counts), from which
    `evaluate.py --predict` estimates how often each image's pixels are wrong. Under --ema "model" is the average,
    what every reader of checkpoints gets, and the trained weights, which --resume goes on from, are kept apart."""
    state = {
        "model": run.scored.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "args": plain_args(run.args),
        "class_names": list(run.class_map.names),
        "num_classes": run.class_map.num_classes,
        "class_map": run.class_map.to_dict(),
        "best_miou": run.best_miou,
        "epochs_since_best": run.since_best,
        "rng": rng_state(run.device),
        "val_reliability": val_reliability,
        "log_row": row,
    }
    if run.averaged is not None:
        state["training_model"], state["ema_updates"] = run.model.state_dict(), int(run.averaged.n_averaged)
    write_checkpoints(state, run.out, improved)


def restore(run: Run, resumed: dict) -> None:
    """Put an interrupted run's optimiser, schedule, scaler, early-stopping and random state back."""
    run.optimizer.load_state_dict(resumed["optimizer"])
    run.scheduler.load_state_dict(resumed["scheduler"])
    run.scaler.load_state_dict(resumed["scaler"])
    run.best_miou, run.since_best, run.first_epoch = (
        resumed["best_miou"], resumed["epochs_since_best"], resumed["epoch"] + 1
    )
    if run.averaged is not None:  # the checkpoint's "model" is the average; the trained weights go on training
        run.averaged.module.load_state_dict(resumed["model"])
        run.averaged.n_averaged.fill_(resumed["ema_updates"])
        run.model.load_state_dict(resumed["training_model"])
    torch.set_rng_state(resumed["rng"]["torch"])
    if run.device.type == "cuda" and resumed["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(resumed["rng"]["cuda"])


# ---- TensorBoard: curves and pictures while training (optional: --tensorboard) -------------------------------------

TENSORBOARD_IMAGES = 4  # the first validation images, shown with their predictions after each epoch


def step_logger(run: Run, epoch: int) -> Callable[[int, torch.Tensor], None] | None:
    """train_one_epoch's on_step: the training loss and learning rate of a step, at its global step number."""
    if run.writer is None:
        return None
    first = (epoch - 1) * len(run.train_loader)

    def on_step(step: int, loss: torch.Tensor) -> None:
        run.writer.add_scalar("train/loss_per_step", float(loss), first + step)
        run.writer.add_scalar("train/lr_per_step", run.optimizer.param_groups[0]["lr"], first + step)

    return on_step


def validation_pictures(run: Run) -> list[tuple[str, np.ndarray]]:
    """(name, the image | its ground truth | the prediction, side by side) of the first validation images."""
    dataset, palette, options = run.val_loader.dataset, run.class_map.palette, InferenceOptions(amp=run.args.amp)
    pictures = []
    for i in range(min(TENSORBOARD_IMAGES, len(dataset))):
        image, target = dataset[i]
        image = image.permute(1, 2, 0).numpy()
        pred = predict(run.scored, image, size=None, options=options)
        row = [image, colourize(target.numpy(), palette), colourize(pred, palette)]
        pictures.append((dataset.pairs[i][0].stem, np.concatenate(row, axis=1)))
    return pictures


def log_epoch(run: Run, epoch: int, train_m: dict, val_m: dict, lr: float, runtime: float) -> None:
    """An epoch's numbers (the log.csv row's) and the validation pictures, to TensorBoard."""
    if run.writer is None:
        return
    scalars = {"loss/train": train_m["loss"], "loss/val": val_m["loss"], "mIoU/train": train_m["miou"],
               "mIoU/val": val_m["miou"], "pixel_acc/val": val_m["pixel_acc"], "lr/epoch_start": lr,
               "time/epoch_s": runtime, "time/data_wait": train_m["data_wait"]}
    scalars |= {f"val_iou/{name}": iou for name, iou in zip(run.class_map.names, val_m["iou"]) if not math.isnan(iou)}
    for tag, value in scalars.items():
        run.writer.add_scalar(tag, value, epoch)
    for name, picture in validation_pictures(run):
        run.writer.add_image(f"val/{name}", picture, epoch, dataformats="HWC")
    run.writer.flush()


# ---- one epoch: the training pass, then validation -------------------------------------------------------------------


class NonFiniteLoss(Exception):
    """The loss became NaN or inf; the message names the epoch and step."""


def all_processes_true(flag: torch.Tensor) -> bool:
    """flag on every DDP process (a host sync; so every process takes the same branch)."""
    if dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


@dataclass(frozen=True)
class StepOptions:
    """How each training step runs."""

    amp_dtype: torch.dtype | None = None  # autocast to this dtype (CUDA), or full precision
    # DeepLabV2's recipe: the logits stay at the head's resolution and the target is downsampled to them (nearest)
    loss_at_feature_resolution: bool = False
    aux_weight: float = 0.0  # adds this multiple of the aux head's loss
    skip_nonfinite: bool = False  # check every step on the host and skip those whose loss is NaN or inf
    show_progress: bool = True
    averaged: AveragedModel | None = None  # --ema: updated from the model after every step
    # on_step(step, loss) every `log_every` steps (TensorBoard): reading the loss waits for the device, so not always
    on_step: Callable[[int, torch.Tensor], None] | None = None
    log_every: int = 20


def step_loss(
    model: nn.Module, criterion: nn.Module, image: torch.Tensor, target: torch.Tensor, options: StepOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass and its loss: (logits, the target at their resolution, loss)."""
    with autocast(image.device, options.amp_dtype):
        out = model(image, upsample=not options.loss_at_feature_resolution, aux=options.aux_weight > 0)
    logits, aux_logits = out if options.aux_weight > 0 else (out, None)
    if options.loss_at_feature_resolution:
        target = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
    loss = criterion(logits, target)
    if aux_logits is not None:  # the aux head helps the backbone train; evaluation never sees it
        loss = loss + options.aux_weight * criterion(aux_logits, target)
    return logits, target, loss


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loader: DataLoader,
    num_classes: int,
    desc: str,
    options: StepOptions = StepOptions(),
) -> dict:
    """One pass over the loader. Train metrics come from the training forward's own predictions; loss and
    metrics accumulate on the device, so the step never waits for the host. data_wait is the share of the pass spent
    waiting for the loader. A non-finite loss is recorded on the device (nonfinite_step: the first such step, or -1)
    and its step is still taken, unless options.skip_nonfinite. Under DDP the metrics are summed over the processes."""
    set_train_mode(model)
    device = next(model.parameters()).device
    cm, loss_sum, images = ConfusionMatrix(num_classes), torch.zeros((), device=device), torch.zeros((), device=device)
    first_bad, skipped, waited = torch.full((), -1, device=device), 0, 0.0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if options.show_progress else True)
    start = ready = time.perf_counter()
    for step, (image, target) in enumerate(bar):
        waited += time.perf_counter() - ready
        image = model_input(image, model, device)
        logits, target, loss = step_loss(model, criterion, image, target.to(device, non_blocking=True), options)
        finite = torch.isfinite(loss.detach())
        first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
        optimizer.zero_grad(set_to_none=True)
        if options.skip_nonfinite and not all_processes_true(finite):
            skipped += 1
            scheduler.step()  # the schedule keeps its pace
            ready = time.perf_counter()
            continue
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if options.averaged is not None:
            options.averaged.update_parameters(unwrap(model))
        loss_sum += loss.detach() * image.shape[0]
        images += image.shape[0]
        cm.update(logits.detach().argmax(1), target)
        if options.on_step is not None and step % options.log_every == 0:
            options.on_step(step, loss.detach())
        if not bar.disable and step % 20 == 0:  # reading the loss syncs with the device, so only now and then
            bar.set_postfix(loss=f"{float(loss_sum / images.clamp_min(1)):.4f}")
        ready = time.perf_counter()
    if dist.is_initialized():
        for total in (cm.mat, loss_sum, images):
            dist.all_reduce(total)
    metrics = {"loss": float(loss_sum / images.clamp_min(1)), **cm.compute()}  # waits for the device's last step
    return {**metrics, "data_wait": waited / (time.perf_counter() - start), "nonfinite_step": int(first_bad),
            "skipped": skipped}


# ---- the training loop: epochs, logging, saving, early stopping ------------------------------------------------------


def begin_epoch(run: Run, epoch: int) -> nn.Module:
    """The schedule's changes from this epoch on (its loss, full resolution after --low-res-epochs, a backbone
    frozen from it), said; its criterion."""
    args = run.args
    if epoch in run.loss_changes:
        run.say(f"Epoch {epoch}: loss is now {run.loss_changes[epoch]}")
    if args.low_res_epochs and epoch == args.low_res_epochs + 1:
        run.say(f"Epoch {epoch}: training at full resolution from now on (epochs 1-{args.low_res_epochs} at half)")
    if args.freeze_at_epoch and epoch >= args.freeze_at_epoch and not backbone_frozen(run.model):
        freeze_backbone(run.model)
        if run.rank == 0:
            write_run_info(run.out, args, list(run.class_map.names), run.model)
        run.say(f"Epoch {epoch}: backbone frozen, trainable params {count_params(run.model)[0]}")
    run.train_loader.sampler.set_epoch(epoch)
    return run.make_loss(value_at(run.loss_changes, epoch, args.loss))


def check_steps(run: Run, epoch: int, train_m: dict) -> None:
    """A non-finite loss stops the run (its checkpoints stay those of the last good epoch) unless it was asked to
    skip such steps; those skipped are said."""
    if train_m["nonfinite_step"] >= 0 and not run.args.skip_nonfinite:
        raise NonFiniteLoss(
            f"non-finite loss at epoch {epoch}, step {train_m['nonfinite_step'] + 1} of {len(run.train_loader)}; "
            f"stopped, {run.out} keeps the checkpoints of the last good epoch. Lower --lr, or pass --skip-nonfinite"
        )
    if train_m["skipped"]:
        run.say(f"Epoch {epoch}: skipped {train_m['skipped']} step(s) with a non-finite loss")
    if run.world > 1:  # every process evaluates with process 0's BatchNorm statistics, the ones it saves
        for buffer in run.scored.buffers():
            dist.broadcast(buffer, 0)


def end_epoch(run: Run, epoch: int, train_m: dict, val_m: dict, lr: float, runtime: float) -> bool:
    """The epoch's lines, checkpoints, log.csv row and TensorBoard numbers; whether to stop early."""
    args = run.args
    run.say(f"Epoch {epoch}/{args.epochs} | train loss {train_m['loss']:.4f} | val loss {val_m['loss']:.4f} | "
            f"val mIoU {val_m['miou']:.4f} | pixel acc {val_m['pixel_acc']:.4f}")
    run.say(f"  Per-class IoU: {format_iou(list(run.class_map.names), val_m['iou'])}")
    improved = val_m["miou"] > run.best_miou  # the same all-reduced numbers on every process: the same decision
    run.best_miou, run.since_best = (val_m["miou"], 0) if improved else (run.best_miou, run.since_best + 1)
    if run.rank == 0:  # the checkpoint first: a kill between the two loses the row, which --resume puts back
        row = log_row(epoch, lr, train_m, val_m, runtime)
        save(run, epoch, improved, val_m["reliability"], row)
        append_log(run.out / "log.csv", row, run.class_map.num_classes)
        log_epoch(run, epoch, train_m, val_m, lr, runtime)
    if improved:
        run.say(f"Saved best model: {run.best_miou:.4f} -> {run.out / 'best.pth'}")
        return False
    run.say(f"No improvement for {run.since_best} epoch(s)")
    if args.patience and run.since_best >= args.patience:
        run.say("Early stopping triggered.")
        return True
    return False


def train(args: argparse.Namespace, checkpoint: dict | None = None, resumed: dict | None = None) -> float:
    """The whole run, from scratch, from a checkpoint's model (fine-tuning), or resumed (--resume) from the
    `last.pth` of an interrupted run: each epoch a training pass, then validation; returns the best val mIoU.
    Under torchrun, process 0 alone prints and writes."""
    if args.resume and resumed is None:
        resumed = load_checkpoint(args.resume)
    run = build_run(args, checkpoint, resumed)
    if resumed is not None:
        restore(run, resumed)
    run.say(
        f"Using device: {run.device} ({run.amp_dtype or 'float32'}) x {run.world} | arch {args.arch} | "
        f"pretrained {args.pretrained} | train size {len(run.train_set)} | val size {len(run.val_loader.dataset)} | "
        f"classes {run.class_map.num_classes} | trainable params {count_params(run.model)[0]}{aux_note(run.model)} | "
        f"out {run.out}"
    )
    start_log(run, resumed)
    if resumed is not None:
        run.say(f"Resuming at epoch {run.first_epoch} of {args.epochs}")
    num_classes = run.class_map.num_classes
    try:
        for epoch in range(run.first_epoch, args.epochs + 1):
            criterion = begin_epoch(run, epoch)
            start, lr = time.time(), run.optimizer.param_groups[0]["lr"]
            options = StepOptions(run.amp_dtype, args.downsample_gt is not None, args.aux_loss, args.skip_nonfinite,
                                  show_progress=run.rank == 0, averaged=run.averaged, on_step=step_logger(run, epoch))
            train_m = train_one_epoch(run.net, criterion, run.optimizer, run.scheduler, run.scaler, run.train_loader,
                                      num_classes, f"Epoch {epoch}/{args.epochs}", options)
            if run.averaged is not None:
                batchnorm_for_average(run.averaged, run.train_loader, run.device)
            check_steps(run, epoch, train_m)
            val_m = evaluate(run.scored, run.val_loader, criterion, run.device, num_classes, run.amp_dtype,
                             show_progress=run.rank == 0)
            if end_epoch(run, epoch, train_m, val_m, lr, time.time() - start):
                break
        run.say(f"Best validation mIoU: {run.best_miou:.4f}")
        return run.best_miou
    finally:
        if run.writer is not None:
            run.writer.close()


# ---- command line ----------------------------------------------------------------------------------------------------


def add_model_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--arch", default="deeplabv3_mobilenet_v3_large", choices=ARCHS)
    group.add_argument("--output-stride", type=int, default=None, choices=(8, 16),
                       help="ResNet DeepLabV3/V3+ only (default: 8 for DeepLabV3, 16 for DeepLabV3+)")
    group.add_argument("--atrous-rates", type=POSITIVE_INT, nargs=3, default=None, metavar="R",
                       help="ASPP's rates, DeepLabV3/V3+ (default: 6 12 18 at output stride 16, 12 24 36 at 8 and "
                            "for deeplabv3_mobilenet_v3_large, torchvision's)")
    group.add_argument("--aux-loss", type=NON_NEGATIVE, default=0.0, metavar="WEIGHT",
                       help="train an auxiliary FCN head on intermediate features, its loss x WEIGHT (torchvision 0.5)")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                       help="ImageNet backbone weights (default: on with --data, off for the demo and with --init)")
    group.add_argument("--init", type=Path, default=None,
                       help="initial weights file (e.g. DeepLab_resnet_pretrained_imagenet.pth)")
    group.add_argument("--freeze-backbone", action="store_true", help="train the head only (backbone frozen)")


def add_optimisation_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--loss", default=None, help=f"loss spec, e.g. ce, ce:0.7,dice:0.3 ({recipe_help('loss')})")
    group.add_argument("--class-weights", default="none",
                       help="CE class weights: none, auto (median frequency balancing), enet (ENet's) or a file")
    group.add_argument("--downsample-gt", type=POSITIVE_INT, default=None, metavar="N",
                       help="loss at 1/N resolution (N: output stride)")
    group.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help=recipe_help("optimizer"))
    group.add_argument("--lr", type=NON_NEGATIVE, default=None, help=f"base (backbone) lr ({recipe_help('lr')})")
    group.add_argument("--momentum", type=number(float, 0, 1), default=0.9)
    group.add_argument("--weight-decay", type=NON_NEGATIVE, default=None, help=recipe_help("weight_decay"))
    group.add_argument("--head-lr-mult", type=POSITIVE, default=None,
                       help=f"head lr multiplier ({recipe_help('head_lr_mult')})")
    group.add_argument("--lr-backbone", type=NON_NEGATIVE, default=None,
                       help="backbone lr, head keeps --lr (default: --lr)")
    group.add_argument("--batch-size", type=POSITIVE_INT, default=8)


def add_schedule_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--epochs", type=POSITIVE_INT, default=16)
    group.add_argument("--poly-power", type=NON_NEGATIVE, default=0.9, help="lr = base * (1 - it/max_it)^power")
    group.add_argument("--warmup-steps", type=COUNT, default=0, help="linear warmup iterations")
    group.add_argument("--poly-power-at", default=None, metavar="E:P,...", help="poly power P from epoch E on")
    group.add_argument("--loss-at", action="append", default=None, metavar="E:SPEC",
                       help="loss SPEC from epoch E on (repeatable)")
    group.add_argument("--freeze-at-epoch", type=POSITIVE_INT, default=None,
                       help="freeze the backbone from this epoch on")
    group.add_argument("--ema", type=NON_NEGATIVE, default=0.0, metavar="EPOCHS",
                       help="validate and save a moving average of the weights, time constant EPOCHS (0: off)")
    group.add_argument("--patience", type=COUNT, default=5,
                       help="early stopping after this many epochs without gain (0: off)")


def add_run_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--out", type=Path, default=None, help="output folder (default: runs/ARCH-TIME)")
    group.add_argument("--resume", type=Path, default=None, help="continue the run of this last.pth (its flags)")
    group.add_argument("--device", type=device_name, default=DEFAULT_DEVICE)
    group.add_argument("--workers", type=COUNT, default=2)
    group.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="mixed precision on CUDA")
    group.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                       help="memory format (auto: channels_last where measured faster for the arch and device)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on CUDA)")
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes")
    group.add_argument("--skip-nonfinite", action="store_true", help="skip steps whose loss is NaN/inf (syncs)")
    group.add_argument("--tensorboard", action="store_true",
                       help="training curves and validation pictures to OUT/tensorboard (pip install tensorboard)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Train DeepLab for semantic segmentation", add_help=add_help)
    data = parser.add_argument_group("data")
    add_data_args(data)
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="val", help="the validation split (val also finds valid, validation)")
    add_transform_args(parser.add_argument_group("augmentation"))
    add_model_args(parser.add_argument_group("model"))
    add_optimisation_args(parser.add_argument_group("optimisation"))
    add_schedule_args(parser.add_argument_group("schedule"))
    add_run_args(parser.add_argument_group("output and hardware"))
    return parser


# ---- entry points: a new, resumed or fine-tuning run, every failure in one line --------------------------------------


def resume_run(path: Path) -> tuple[argparse.Namespace, None, dict]:
    """train()'s arguments to continue the run that wrote `path`: that run's flags (defaults for any flag added
    since), no fine-tuning source, and the checkpoint itself, read once."""
    state = load_checkpoint(path)
    args = get_args_parser().parse_args([])
    for name, value in state["args"].items():
        is_path = name in ("data", "out", "init", "checkpoint", "classes") and value
        setattr(args, name, Path(value) if is_path else value)
    args.resume = path
    check_resumed_flags(path, state["args"])
    return args, None, state


def check_resumed_flags(path: Path, flags: dict) -> None:
    """A checkpoint's flags, checked by the parser's own types and choices, as if typed now: an edited or foreign
    checkpoint (or one whose --device this machine lacks) stops in one line, not hours in."""
    for action in get_args_parser()._actions:
        value = flags.get(action.dest)
        if value is None or not action.option_strings:
            continue
        for item in value if isinstance(value, list) else [value]:
            try:
                parsed = action.type(str(item)) if action.type is not None and not isinstance(item, bool) else item
                if action.choices is not None and parsed not in action.choices:
                    raise ValueError(f"not one of {', '.join(map(str, action.choices))}")
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise ModelError(f"--resume {path}: the run's {action.option_strings[0]} {item!r} is refused here "
                                 f"({e})") from None


def interrupted(args: argparse.Namespace | None) -> str:
    """The line for Ctrl-C: what was kept, and the command that goes on from it."""
    out = Path(args.out) if args is not None and args.out else None
    if out is None or not (out / "last.pth").exists():
        return "interrupted before any epoch was saved: nothing to resume"
    script = Path(sys.argv[0]).name if sys.argv[0].endswith(".py") else "train_deeplab.py"
    return f"interrupted; the last finished epoch is in {out / 'last.pth'}: python {script} --resume {out / 'last.pth'}"


def run(prepare: Callable[[], tuple[argparse.Namespace, dict | None, dict | None]]) -> None:
    """prepare() train()'s arguments (args, a checkpoint to fine-tune, a checkpoint to resume), then train; every
    failure a user can cause ends in one line and a non-zero exit, with no traceback."""
    args = None
    try:
        args, checkpoint, resumed = prepare()
        train(args, checkpoint, resumed)
    except (DatasetError, ModelError, LossSpecError, NonFiniteLoss) as e:
        sys.exit(f"error: {one_line(e)}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: CUDA ran out of memory; try a smaller --batch-size or --crop")
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        sys.exit("error: out of memory on the CPU; try a smaller --batch-size, --size or --crop")
    except KeyboardInterrupt:
        sys.stderr.write(f"{interrupted(args)}\n")
        sys.exit(130)  # the shell's status for a process stopped by Ctrl-C
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(args: argparse.Namespace) -> None:
    run(lambda: resume_run(args.resume) if args.resume else (args, None, None))  # a resumed run keeps its flags


if __name__ == "__main__":
    main(get_args_parser().parse_args())
