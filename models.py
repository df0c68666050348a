"""DeepLab models: torchvision's DeepLabV3 variants and DeepLabV2 (ResNet-101 + ASPP) as in the original paper.

Every model is a `SegmentationModel`: `backbone` -> `classifier` -> bilinear upsampling, so `forward` returns
logits [B, C, H, W] at the input resolution and the optimizer can give the head its own learning rate.
"""

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50, deeplabv3_resnet101
from torchvision.ops.misc import FrozenBatchNorm2d

ARCHS = ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv2_resnet101")
OUTPUT_STRIDE = {
    "deeplabv3_mobilenet_v3_large": 16,
    "deeplabv3_resnet50": 8,
    "deeplabv3_resnet101": 8,
    "deeplabv2_resnet101": 8,
}


class ModelError(Exception):
    """A model cannot be built or initialised as asked; the message is shown to the user as one line."""


class SegmentationModel(nn.Module):
    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        """Logits at the input resolution, or at the feature resolution (1 / output stride) with upsample=False."""
        features = self.backbone(x)
        if isinstance(features, dict):  # torchvision's IntermediateLayerGetter
            features = features["out"]
        logits = self.classifier(features)
        if not upsample:
            return logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


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


def _download_failed(arch: str, error: Exception) -> ModelError:
    return ModelError(
        f"could not get the ImageNet weights for {arch} ({type(error).__name__}: {error}); "
        "offline, train from scratch with --no-pretrained or start from a local file with --init PATH"
    )


def build_model(arch: str, num_classes: int, pretrained_backbone: bool = False) -> SegmentationModel:
    """A DeepLab model whose forward gives logits [B, num_classes, H, W] at the input resolution."""
    if arch not in ARCHS:
        raise ModelError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    try:
        if arch == "deeplabv2_resnet101":
            model = SegmentationModel(DeepLabV2ResNet(), ASPPV2(2048, num_classes))
            if pretrained_backbone:
                state = ResNet101_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
                model.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
            return model
        builder, weights = {
            "deeplabv3_mobilenet_v3_large": (deeplabv3_mobilenet_v3_large, MobileNet_V3_Large_Weights.IMAGENET1K_V1),
            "deeplabv3_resnet50": (deeplabv3_resnet50, ResNet50_Weights.IMAGENET1K_V1),
            "deeplabv3_resnet101": (deeplabv3_resnet101, ResNet101_Weights.IMAGENET1K_V1),
        }[arch]
        net = builder(weights=None, weights_backbone=weights if pretrained_backbone else None, num_classes=num_classes)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a broken download fails its hash check
        raise _download_failed(arch, e) from None
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            # MobileNetV3's momentum of 0.01 suits 600 ImageNet epochs; in runs of a few hundred steps the running
            # statistics would stay near their initial values and wreck every eval-mode prediction
            m.momentum = 0.1
    return SegmentationModel(net.backbone, net.classifier)


def default_head_lr_mult(arch: str) -> float:
    """DeepLabV2 trains its ASPP at 10x the backbone's learning rate, as in the paper; DeepLabV3 does not."""
    return 10.0 if arch == "deeplabv2_resnet101" else 1.0


def default_lr(arch: str, from_scratch: bool) -> float:
    """Base SGD learning rate: DeepLabV2's paper value (its head gets 10x), 0.01 to fine-tune DeepLabV3 from
    ImageNet weights, and 0.05 from scratch, where randomly initialised layers need larger steps."""
    if arch == "deeplabv2_resnet101":
        return 2.5e-4
    return 0.05 if from_scratch else 0.01


def param_groups(
    model: SegmentationModel, lr: float, head_lr_mult: float, backbone_lr: float | None = None
) -> list[dict]:
    """Optimizer groups: backbone at `backbone_lr` (default `lr`), head at `lr * head_lr_mult`; frozen
    parameters are left out."""
    backbone_lr = lr if backbone_lr is None else backbone_lr
    groups = [
        {"name": "backbone", "params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": backbone_lr},
        {
            "name": "head",
            "params": [p for p in model.classifier.parameters() if p.requires_grad],
            "lr": lr * head_lr_mult,
        },
    ]
    return [g for g in groups if g["params"]]


def freeze_backbone(model: SegmentationModel) -> None:
    """Stop training the backbone: no gradients (so SGD and AdamW skip it, momentum and weight decay included)
    and, through `set_train_mode`, its BatchNorm statistics stay as they are."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)


def backbone_frozen(model: SegmentationModel) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except that a frozen backbone stays in eval mode, so its BatchNorm running stats are kept."""
    model.train()
    inner = unwrap(model)
    if backbone_frozen(inner):
        inner.backbone.eval()


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


def model_from_checkpoint(checkpoint: dict, path: Path) -> SegmentationModel:
    """The checkpoint's model, with its weights."""
    model = build_model(checkpoint["args"]["arch"], checkpoint["num_classes"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise ModelError(f"checkpoint {path}: weights do not fit {checkpoint['args']['arch']}") from None
    return model


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


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: tuple[int, int], batch: int = 1) -> float:
    """Multiply-accumulates of one forward pass at `size`, counted on the meta device (no compute)."""
    meta = copy.deepcopy(model).to("meta").eval()
    with FlopCounterMode(display=False) as counter:
        meta(torch.empty(batch, 3, *size, device="meta"))
    return counter.get_total_flops() / 2
