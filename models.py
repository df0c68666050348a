"""DeepLab models: DeepLabV3 and DeepLabV3+ on torchvision's backbones, and DeepLabV2 (ResNet-101 + ASPP) as in
the original paper.

Every model is a `SegmentationModel`: `backbone` -> `classifier` (the head: ASPP, and DeepLabV3+'s decoder) ->
bilinear upsampling, so `forward` returns logits [B, C, H, W] at the input resolution and the optimizer can give the
head its own learning rate. An optional `aux_classifier` (torchvision's FCN head) is trained beside it and is used
by nothing else.
"""

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    mobilenet_v3_large,
    resnet50,
    resnet101,
)
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops.misc import FrozenBatchNorm2d

from annotations import cache_root
from dataset import ClassMap, cityscapes_table, class_map_of, hw_pair, normalize, numbered_table, offroad_table

ARCHS = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3plus_mobilenet_v3_large",
    "deeplabv3plus_resnet50",
    "deeplabv3plus_resnet101",
    "deeplabv2_resnet101",
)


RESNETS = {
    "resnet50": (resnet50, ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (resnet101, ResNet101_Weights.IMAGENET1K_V1),
}


class ModelError(Exception):
    """A model cannot be built or initialised as asked; the message is shown to the user as one line."""


# ---- architectures: DeepLabV3/V3+ on torchvision's backbones, DeepLabV2 as in the paper ------------------------------


def default_output_stride(arch: str) -> int:
    """8 for DeepLabV2 and DeepLabV3 on a ResNet (torchvision's choice), 16 for DeepLabV3+ (the paper's training
    setting) and for MobileNetV3 (torchvision's dilated MobileNetV3 has no other)."""
    return 16 if "plus" in arch or "mobilenet" in arch else 8


def output_stride_of(arch: str, requested: int | None) -> int:
    """The output stride an arch is built with; only the ResNet DeepLabV3 and DeepLabV3+ archs can change it."""
    stride = default_output_stride(arch) if requested is None else requested
    if stride != default_output_stride(arch) and not (arch.startswith("deeplabv3") and "resnet" in arch):
        raise ModelError(f"--output-stride {stride}: {arch} has output stride {default_output_stride(arch)} only")
    if stride not in (8, 16):
        raise ModelError(f"--output-stride must be 8 or 16, not {stride}")
    return stride


def atrous_rates_of(
    arch: str, output_stride: int, requested: tuple[int, ...] | None = None
) -> tuple[int, int, int] | None:
    """ASPP's three atrous rates: DeepLabV3's (6, 12, 18) at output stride 16 and twice them at 8, but (12, 24, 36)
    for the MobileNetV3 DeepLabV3 (torchvision's); the three given, on a DeepLabV3 or DeepLabV3+ arch. None for
    DeepLabV2, whose ASPP has the paper's four rates and no choice."""
    if arch == "deeplabv2_resnet101":
        if requested is not None:
            raise ModelError("--atrous-rates: DeepLabV2's ASPP has the paper's four rates (6, 12, 18, 24) only")
        return None
    if requested is None:
        return (12, 24, 36) if output_stride == 8 or arch == "deeplabv3_mobilenet_v3_large" else (6, 12, 18)
    if len(requested) != 3 or min(requested) < 1:
        raise ModelError(f"--atrous-rates takes three positive rates, got {' '.join(map(str, requested))}")
    return (requested[0], requested[1], requested[2])


def logit_stride(arch: str, output_stride: int) -> int:
    """The stride of the head's logits before upsampling: 4 behind DeepLabV3+'s decoder, else the output stride."""
    return 4 if "plus" in arch else output_stride


class SegmentationModel(nn.Module):
    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(
        self, x: torch.Tensor, upsample: bool = True, aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at the input resolution, or at the head's own resolution with upsample=False. With aux=True (in
        training, with an aux head) also the aux head's logits, at the same resolution as the main ones."""
        features = self.backbone(x)
        if not isinstance(features, dict):  # DeepLabV2's backbone returns its last stage
            features = {"out": features}
        low = features.get("low")  # DeepLabV3+'s decoder also takes the stride-4 features
        logits = self.classifier(features["out"]) if low is None else self.classifier(features["out"], low)
        if upsample:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not aux:
            return logits
        aux_logits = self.aux_classifier(features["aux"])
        return logits, F.interpolate(aux_logits, size=logits.shape[-2:], mode="bilinear", align_corners=False)


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+'s head (Chen et al., ECCV 2018): ASPP on the last stage (1x1, three 3x3 atrous convs and image
    pooling, 256 channels each, projected to 256; torchvision's ASPP, as in DeepLabV3, with its dropout of 0.5),
    upsampled bilinearly to stride 4 and concatenated with the stride-4 features projected to 48 channels, then two
    3x3 convs of 256 channels with BatchNorm and ReLU and a 1x1 classifier."""

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, rates: tuple[int, int, int]):
        super().__init__()
        self.aspp = ASPP(in_channels, rates)
        self.low = nn.Sequential(nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.fuse = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
        )
        self.classify = nn.Conv2d(256, num_classes, 1)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.aspp(x), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classify(self.fuse(torch.cat([x, self.low(low)], dim=1)))


class Bottleneck(nn.Module):
    """ResNet bottleneck in the original DeepLab (Caffe) style: the stride sits in the first 1x1 conv."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class DeepLabV2ResNet(nn.Module):
    """ResNet-101 of DeepLabV2: max-pool with ceil_mode, layer3/layer4 dilated by 2/4 (output stride 8),
    BatchNorm frozen (its statistics and affine terms are buffers, so it never trains)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 23, 3)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4 or dilation > 1:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), FrozenBatchNorm2d(planes * 4)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPPV2(nn.Module):
    """DeepLabV2's ASPP: parallel 3x3 convs with dilations 6, 12, 18, 24 whose class scores are summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.conv2d_list)


def _download(arch: str, build, *args, **kwargs):
    """build(*args, **kwargs), where a failure to download ImageNet weights is one line saying what to do."""
    try:
        return build(*args, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a broken download fails its hash check
        raise ModelError(
            f"could not get the ImageNet weights for {arch} ({type(e).__name__}: {e}); "
            "offline, train from scratch with --no-pretrained or start from a local file with --init PATH"
        ) from None


def build_model(
    arch: str, num_classes: int, pretrained_backbone: bool = False, output_stride: int | None = None, aux: bool = False,
    atrous_rates: tuple[int, ...] | None = None,
) -> SegmentationModel:
    """A DeepLab model whose forward gives logits [B, num_classes, H, W] at the input resolution; `aux` adds the
    auxiliary FCN head (DeepLabV3 and DeepLabV3+); `atrous_rates` those of its ASPP (`atrous_rates_of`)."""
    if arch not in ARCHS:
        raise ModelError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    stride = output_stride_of(arch, output_stride)
    rates = atrous_rates_of(arch, stride, atrous_rates)
    if arch == "deeplabv2_resnet101":
        if aux:
            raise ModelError("--aux-loss needs a DeepLabV3 or DeepLabV3+ arch")
        model = SegmentationModel(DeepLabV2ResNet(), ASPPV2(2048, num_classes))
        if pretrained_backbone:
            state = _download(arch, ResNet101_Weights.IMAGENET1K_V1.get_state_dict, progress=False)
            model.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        return model
    if "mobilenet" in arch:
        weights = MobileNet_V3_Large_Weights.IMAGENET1K_V1 if pretrained_backbone else None
        features = _download(arch, mobilenet_v3_large, weights=weights, dilated=True).features
        stages = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
        layers = {"out": stages[-1], "aux": stages[-4], "low": stages[2] - 1}  # torchvision's picks; low: stride 4
        channels = {name: features[i].out_channels for name, i in layers.items()}
        layers = {name: str(i) for name, i in layers.items()}
        trunk = features
    else:
        builder, weights = RESNETS[arch.rsplit("_", 1)[1]]
        dilate = [False, stride == 8, True]
        trunk = _download(
            arch, builder, weights=weights if pretrained_backbone else None, replace_stride_with_dilation=dilate
        )
        layers, channels = {"out": "layer4", "aux": "layer3", "low": "layer1"}, {"out": 2048, "aux": 1024, "low": 256}
    plus = "plus" in arch
    wanted = {"out"} | ({"aux"} if aux else set()) | ({"low"} if plus else set())
    backbone = IntermediateLayerGetter(trunk, return_layers={layers[name]: name for name in wanted})
    if plus:
        head = DeepLabV3PlusHead(channels["out"], channels["low"], num_classes, rates)
    else:
        head = DeepLabHead(channels["out"], num_classes, rates)
    model = SegmentationModel(backbone, head, FCNHead(channels["aux"], num_classes) if aux else None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            # MobileNetV3's momentum of 0.01 suits 600 ImageNet epochs; in runs of a few hundred steps the running
            # statistics would stay near their initial values and wreck every eval-mode prediction
            m.momentum = 0.1
    return model


# ---- placing on the device, and the memory format --------------------------------------------------------------------


# Which memory format is faster on the CPU depends on the CPU and the input size as much as on torch and the model:
# on torch 2.14.1 channels_last ran a MobileNetV3 training step 1.37x contiguous here at 160x224, 0.8x at 48x64, and
# 0.90x on issue 28's EPYC (BENCHMARKS.md). So `--channels-last auto` races the two on the CPU, once per machine,
# torch, arch and input shape.
LAYOUTS_CACHE = "deeplab_layouts.json"  # under ~/.cache: each race's images/s in each format
LAYOUT_STEPS = 3  # timed steps of each format per race, after one warm-up step of each; the fastest counts
LAYOUT_BUDGET = 30.0  # seconds a race's timed rounds may take, at least one round
LAYOUT_SIZE = (512, 512)  # the inference race's input where the model was trained at no fixed size
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def device_name(text: str) -> str:
    """A parser type for --device: a device torch knows and this machine has (cpu, cuda, cuda:1, mps)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is no device torch knows (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch finds no CUDA device here (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch finds no MPS device here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu, cuda and mps are supported")
    return text


DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the platform's word for it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def race_layouts(model: nn.Module, shape: tuple[int, int, int], train: bool, steps: int = LAYOUT_STEPS
                 ) -> dict[str, float]:
    """Images/s of `model` on the CPU in each memory format, on random input of `shape` (batch, H, W): training
    steps (forward, cross-entropy, backward) or, train=False, inference passes. The formats take turns, step by
    step, so that a machine slowing down slows both alike, and each format's fastest step counts (on a shared
    machine noise only adds time). A copy runs: the model's weights, BatchNorm statistics and the random state are
    left as they were."""
    batch, height, width = shape
    copies = {name: copy.deepcopy(model).to(memory_format=fmt).train(train) for name, fmt in FORMATS.items()}
    times: dict[str, list[float]] = {name: [] for name in FORMATS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x, y = torch.randn(batch, 3, height, width), torch.zeros(batch, height, width, dtype=torch.long)
        rounds = steps + 1  # the first round warms up; slow steps get fewer rounds, within LAYOUT_BUDGET
        while len(times["contiguous"]) < rounds:
            for name, net in copies.items():
                start = time.perf_counter()
                with torch.set_grad_enabled(train):
                    out = net(x.contiguous(memory_format=FORMATS[name]))
                    if train:
                        F.cross_entropy(out.float(), y).backward()
                        net.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - start)
            if len(times["contiguous"]) == 1:
                warm_up = sum(seconds[0] for seconds in times.values())
                rounds = 1 + max(1, min(steps, int(LAYOUT_BUDGET / warm_up)))
    return {name: batch / min(seconds[1:]) for name, seconds in times.items()}


def measured_layout(model: nn.Module, arch: str, shape: tuple[int, int, int], train: bool, fresh: bool = False,
                    steps: int = LAYOUT_STEPS) -> tuple[dict, bool]:
    """The race of the two memory formats for `model` on this CPU (race_layouts), from the cache when this machine,
    torch, arch, mode and shape were raced before (fresh: raced again, and cached), and whether it was cached."""
    path = cache_root() / LAYOUTS_CACHE
    key = (f"{cpu_name()}, {torch.get_num_threads()} threads | torch {torch.__version__} | {arch} | "
           f"{'train' if train else 'eval'} {'x'.join(map(str, shape))}")
    try:
        races = json.loads(path.read_text())
    except (OSError, ValueError):
        races = {}
    races = races if isinstance(races, dict) else {}
    cached = races.get(key)
    if not fresh and isinstance(cached, dict) and set(cached) == set(FORMATS) and all(
            isinstance(v, (int, float)) for v in cached.values()):
        return cached, True
    races[key] = race_layouts(model, shape, train, steps)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(races, indent=1))
        tmp.replace(path)
    except OSError:  # a cache that cannot be written: the race is run again next time
        pass
    return races[key], False


def layout_choice(choice: str, arch: str, device: torch.device, model: nn.Module | None = None,
                  shape: tuple[int, int, int] | None = None, train: bool = False, fresh: bool = False,
                  steps: int = LAYOUT_STEPS) -> tuple[bool, str]:
    """--channels-last {auto,on,off}: whether to use channels_last, and why. auto: on CUDA channels_last (NVIDIA's
    layout for convolutions under autocast; unmeasured here), on the CPU the winner of the race of both formats
    for this model and input `shape` (measured_layout), on other devices contiguous."""
    if choice != "auto":
        return choice == "on", f"--channels-last {choice}"
    if device.type != "cpu" or model is None:
        return device.type == "cuda", f"--channels-last auto on {device.type}"
    race, cached = measured_layout(model, arch, shape or (1, *LAYOUT_SIZE), train, fresh, steps)
    faster = race["channels_last"] > race["contiguous"]
    when = f"raced before, {cache_root() / LAYOUTS_CACHE}" if cached else "raced now"
    return faster, (f"--channels-last auto: channels_last {race['channels_last']:.2f} against contiguous "
                    f"{race['contiguous']:.2f} images/s on this CPU ({when})")


def place(model: nn.Module, arch: str, channels_last: str, device: torch.device,
          shape: tuple[int, int, int] | None = None, train: bool = False) -> nn.Module:
    """The model on `device`, in the memory format that --channels-last {auto,on,off} picks for it there, for
    input batches of `shape` (batch, H, W), trained (train=True) or evaluated."""
    model = model.to(device)
    faster, _ = layout_choice(channels_last, arch, device, model, shape, train)
    return model.to(memory_format=torch.channels_last) if faster else model


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """The memory format the model's convolutions are in, for its inputs to follow (its first conv wider than 1x1:
    a 1x1 weight is laid out the same either way)."""
    for module in unwrap(model).modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            w = module.weight
            channels_last = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
            return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


def model_input(images: torch.Tensor, model: nn.Module, device: torch.device) -> torch.Tensor:
    """uint8 images [B, 3, H, W] as `model` takes them: on `device`, normalized, in the memory format of its convs."""
    return normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format_of(model))


# ---- parameter groups: the head's own learning rate ------------------------------------------------------------------


def param_groups(
    model: SegmentationModel, lr: float, head_lr_mult: float, backbone_lr: float | None = None
) -> list[dict]:
    """Optimizer groups: backbone at `backbone_lr` (default `lr`), head (ASPP, DeepLabV3+'s decoder, the aux head)
    at `lr * head_lr_mult`; frozen parameters are left out."""
    backbone_lr = lr if backbone_lr is None else backbone_lr
    heads = [model.classifier] + ([model.aux_classifier] if model.aux_classifier is not None else [])
    groups = [
        {"name": "backbone", "params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": backbone_lr},
        {
            "name": "head",
            "params": [p for h in heads for p in h.parameters() if p.requires_grad],
            "lr": lr * head_lr_mult,
        },
    ]
    return [g for g in groups if g["params"]]


# ---- freezing the backbone -------------------------------------------------------------------------------------------


def freeze_backbone(model: SegmentationModel) -> None:
    """Stop training the backbone: no gradients (so SGD and AdamW skip it, momentum and weight decay included)
    and, through `set_train_mode`, its BatchNorm statistics stay as they are."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)


def backbone_frozen(model: SegmentationModel) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except that a frozen backbone stays in eval mode, so its BatchNorm running stats are kept."""
    model.train()
    inner = unwrap(model)
    if backbone_frozen(inner):
        inner.backbone.eval()


# ---- weights and checkpoints -----------------------------------------------------------------------------------------


def _init_key(key: str) -> str:
    """Map a key of an external weights file to this repository's names."""
    for prefix in ("module.", "_orig_mod.", "Scale."):  # DDP, torch.compile, and the Caffe-converted DeepLab files
        key = key.removeprefix(prefix)
    if key.startswith(("backbone.", "classifier.")):
        return key
    return "backbone." + key


def _load_file(path: Path, what: str) -> object:
    """torch.load with weights_only=True: a file that would run code when unpickled is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{what} {path} does not exist") from None
    except Exception as e:  # truncated, not a torch file, or carrying pickled code: name the file, not the unpickler
        raise ModelError(
            f"{what} {path} cannot be loaded safely ({type(e).__name__}): truncated, or not plain tensors"
        ) from None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by train_deeplab.py: model, optimizer, scheduler, scaler, epoch, args, class names."""
    checkpoint = _load_file(path, "checkpoint")
    needed = {"model", "args", "num_classes", "class_names"}
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys():
        raise ModelError(
            f"checkpoint {path} is not a checkpoint of this repository (needs {', '.join(sorted(needed))})"
        )
    return checkpoint


def load_weights(model: SegmentationModel, checkpoint: dict, path: Path) -> None:
    """A checkpoint's weights into `model`, which may have another output stride (the weights are the same) or
    gain or lose the aux head (a fine-tuning run may add or drop it); anything else that does not fit is an error."""
    state = checkpoint["model"]
    if model.aux_classifier is None:
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        fits = not unexpected and all(k.startswith("aux_classifier.") for k in missing)
    except RuntimeError:  # a tensor of another shape
        fits = False
    if not fits:
        raise ModelError(f"checkpoint {path}: weights do not fit {checkpoint['args']['arch']}")


def model_from_checkpoint(checkpoint: dict, path: Path) -> SegmentationModel:
    """The checkpoint's model (arch, output stride, atrous rates, aux head as it was trained), with its weights."""
    run = checkpoint["args"]
    model = build_model(run["arch"], checkpoint["num_classes"], output_stride=run.get("output_stride"),
                        aux=bool(run.get("aux_loss")), atrous_rates=run.get("atrous_rates"))
    load_weights(model, checkpoint, path)
    return model


def checkpoint_class_map(checkpoint: dict) -> ClassMap:
    """The class map the model was trained with (checkpoints written before class maps: its layout's table, or
    ids 0..C-1 for the folder layout)."""
    if "class_map" in checkpoint:
        return ClassMap.from_dict(checkpoint["class_map"])
    names = tuple(checkpoint["class_names"])
    for table in (offroad_table(), cityscapes_table()):
        if names == table.names:
            return class_map_of(table, "index")
    return class_map_of(numbered_table(len(names), list(names)), "index")


def model_with_classes(
    checkpoint: dict, path: Path, device: str | torch.device = "cpu", channels_last: str = "auto"
) -> SegmentationModel:
    """load_model for a checkpoint already read from `path`."""
    run = checkpoint["args"]
    shape = (1, *(hw_pair(run.get("size")) or LAYOUT_SIZE))
    model = place(model_from_checkpoint(checkpoint, path), run["arch"], channels_last, torch.device(device), shape)
    model.eval()
    model.class_map = checkpoint_class_map(checkpoint)
    model.class_names, model.palette = list(model.class_map.names), model.class_map.palette
    model.size, model.arch, model.run = hw_pair(run.get("size")), run["arch"], run
    return model


def load_model(
    path: str | Path, device: str | torch.device = "cpu", channels_last: str = "auto"
) -> SegmentationModel:
    """A trained model from its checkpoint (best.pth or last.pth), in eval mode on `device`, ready to predict:

        model = load_model("runs/x/best.pth")
        model.class_names, model.palette  # the class table it was trained with, and each class's colour
        model.size                        # the (H, W) it was trained at (None: each image as it is)

    It also keeps `class_map` (how mask values map to classes), `arch` and `run` (the training run's arguments)."""
    return model_with_classes(load_checkpoint(Path(path)), Path(path), device, channels_last)


def load_init(model: SegmentationModel, path: Path) -> str:
    """Initialise from a weights file: a checkpoint of this repository, a plain state dict of the model, or a
    bare backbone such as DeepLab's `DeepLab_resnet_pretrained_imagenet.pth`. Tensors whose name or shape has
    no match here (an ImageNet `fc`, another dataset's classifier) are skipped; every backbone tensor must load.
    Returns a one-line summary."""
    state = _load_file(path, "--init file")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"--init file {path} does not hold a state dict")
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        name = _init_key(key)
        if name in own and isinstance(value, torch.Tensor) and value.shape == own[name].shape:
            loaded[name] = value
        else:
            skipped.append(key)
    missing = [k for k in own if k.startswith("backbone.") and k not in loaded]
    if missing:
        raise ModelError(f"--init file {path} lacks {len(missing)} backbone tensors of this arch, e.g. {missing[0]}")
    model.load_state_dict(loaded, strict=False)
    return f"init: loaded {len(loaded)} tensors from {path}, skipped {len(skipped)}" + (
        f" (e.g. {skipped[0]})" if skipped else ""
    )


# ---- counting: parameters and multiply-accumulates -------------------------------------------------------------------


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the model that predicts: an aux head is not counted (aux_params)."""
    params = [p for name, p in model.named_parameters() if not name.startswith("aux_classifier.")]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def aux_params(model: SegmentationModel) -> int:
    """Parameters of the aux head, which only training uses."""
    return sum(p.numel() for p in model.aux_classifier.parameters()) if model.aux_classifier is not None else 0


def count_macs(model: nn.Module, size: tuple[int, int], batch: int = 1) -> tuple[float, float]:
    """Multiply-accumulates of one forward pass at `size`, counted on the meta device (no compute): (the second
    study's convention, which is fvcore's: convolutions and matrix products, plus two per output element of an
    affine BatchNorm (scale and shift; one without) and four per output element of bilinear upsampling;
    convolutions and matrix products alone)."""
    meta = copy.deepcopy(model).to("meta").eval()
    norm_elements = []

    def count_norm(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        norm_elements.append((2 if getattr(module, "affine", True) else 1) * out.numel())  # Frozen: always affine

    for module in meta.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            module.register_forward_hook(count_norm)
    upsample = torch.ops.aten.upsample_bilinear2d
    bilinear = {upsample: lambda *args, out_shape, **kwargs: 2 * 4 * math.prod(out_shape)}  # in FLOPs: 2 per MAC
    with FlopCounterMode(display=False, custom_mapping=bilinear) as counter:
        meta(torch.empty(batch, 3, *size, device="meta"))
    flops = counter.get_flop_counts()["Global"]
    convolutions = sum(n for op, n in flops.items() if op is not upsample) / 2
    return convolutions + flops.get(upsample, 0) / 2 + sum(norm_elements), convolutions
