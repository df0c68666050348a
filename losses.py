"""Segmentation losses, each an nn.Module with `forward(logits, target)`; their speeds: benchmarks/lovasz.py.

logits: [B, C, H, W] float (any dtype; computed in float32 since fp16 sums overflow).
target: [B, H, W] int64 class indices; pixels equal to `ignore_index` take no part in the loss and get no
gradient. A batch whose pixels are all ignored gives a 0-d zero that is still connected to the graph.
No loss synchronises with the host, so they are safe inside a CUDA training step.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from dataset import IGNORE_INDEX

# ---- the losses: forward(logits [B, C, H, W], target [B, H, W]) -> a scalar; IGNORE_INDEX pixels count nowhere -------


def _valid_onehot(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and one-hot target, both [B, C, H, W] float32 and zero at ignored pixels."""
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(dim=1) * valid
    onehot = F.one_hot(torch.where(valid[:, 0], target, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    return probs, onehot.float()


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy, -sum_i w_{y_i} log p_{i,y_i} / sum_i w_{y_i} over non-ignored pixels i
    (w = 1 without class weights, which makes it the plain mean)."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.float(), target, self.weight, ignore_index=self.ignore_index, reduction="sum")
        valid = target != self.ignore_index
        if self.weight is None:
            denom = valid.sum()
        else:
            denom = (self.weight[torch.where(valid, target, 0)] * valid).sum()
        # an all-ignored batch has total == 0 exactly, so the clamp only turns 0/0 into 0
        return total / denom.clamp_min(1e-12)


class OhemCrossEntropyLoss(nn.Module):
    """Online hard-example mining (bootstrapped cross-entropy, Wu et al. 2016): the mean of the per-pixel
    cross-entropies l_i = -log p_{i,y_i} of the k hardest non-ignored pixels, k = ceil(fraction * B * H * W):
    loss = (sum of the k largest l_i) / min(k, number of non-ignored pixels). Ignored pixels have l_i = 0, so they
    enter the top k only when fewer than k pixels count, and then add nothing. Easy pixels (most of a road or
    sky) get no gradient, the rare classes' pixels more of it."""

    def __init__(self, fraction: float = 0.25, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.fraction, self.ignore_index = fraction, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pixel = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none").flatten()
        k = max(1, math.ceil(self.fraction * pixel.numel()))
        counted = (target != self.ignore_index).sum().clamp(1, k)
        return pixel.topk(k, sorted=False).values.sum() / counted


class DiceLoss(nn.Module):
    """Soft multi-class Dice over the whole batch: dice_c = (2 sum p_c g_c + smooth) / (sum p_c + sum g_c + smooth),
    loss = mean_c present_c * (1 - dice_c), where present_c says class c occurs in the target. Absent classes
    add 0 but still count in the mean (the segmentation_models_pytorch convention)."""

    def __init__(self, smooth: float = 0.0, eps: float = 1e-7, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.smooth, self.eps, self.ignore_index = smooth, eps, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, onehot = _valid_onehot(logits, target, self.ignore_index)
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth).clamp_min(self.eps)
        present = onehot.sum(dims) > 0
        return ((1 - dice) * present).mean()


class TverskyLoss(nn.Module):
    """Tversky loss, aggregated as DiceLoss: t_c = (TP + smooth) / (TP + alpha FP + beta FN + smooth) with
    TP = sum p_c g_c, FP = sum p_c (1 - g_c), FN = sum (1 - p_c) g_c; alpha weighs false positives, beta false
    negatives (alpha = beta = 0.5 is Dice)."""

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        smooth: float = 0.0,
        eps: float = 1e-7,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.alpha, self.beta, self.smooth, self.eps, self.ignore_index = alpha, beta, smooth, eps, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, onehot = _valid_onehot(logits, target, self.ignore_index)
        dims = (0, 2, 3)
        tp = (probs * onehot).sum(dims)
        fp = probs.sum(dims) - tp
        fn = onehot.sum(dims) - tp
        tversky = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth).clamp_min(self.eps)
        present = onehot.sum(dims) > 0
        return ((1 - tversky) * present).mean()


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017): mean over non-ignored pixels of -alpha_t (1 - p_t)^gamma log p_t,
    p_t the probability of the true class. alpha: None (1), one float for all classes, or one per class."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | list[float] | torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.gamma, self.ignore_index = gamma, ignore_index
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0)
        logp_t = logits.float().log_softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -((1 - logp_t.exp()) ** self.gamma) * logp_t
        if self.alpha is not None:
            loss = loss * (self.alpha[safe] if self.alpha.ndim else self.alpha)
        return (loss * valid).sum() / valid.sum().clamp_min(1)


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018, 'present' classes) of each of N groups of pixels.

    probs [N, C, P] softmax probabilities, labels [N, P], valid [N, P] bool. Returns [N]: for each group, the mean
    over classes present in it of <sorted errors, gradient of the Lovász extension of the Jaccard loss>; 0 where
    no class is present. All classes are sorted at once. Ignored pixels get error 0 and foreground 0: they sort
    after every pixel with a positive error and add nothing, so the value equals that of dropping them, while
    shapes stay static (no boolean indexing, no host sync).
    """
    classes = torch.arange(probs.shape[1], device=probs.device).view(1, -1, 1)
    # built [N, C, P] in place: a permuted one_hot ([N, P, C] strides) made every later op strided, 2x the time
    fg = ((labels.unsqueeze(1) == classes) & valid.unsqueeze(1)).to(probs.dtype)
    errors = (fg - probs).abs() * valid.unsqueeze(1)
    errors_sorted, perm = errors.sort(dim=2, descending=True)
    fg_sorted = fg.gather(2, perm)
    gts = fg_sorted.sum(dim=2, keepdim=True)
    intersection = gts - fg_sorted.cumsum(dim=2)
    union = gts + (1 - fg_sorted).cumsum(dim=2)  # >= 1 from the first position on: no division by zero
    jaccard = 1 - intersection / union
    grad = torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=2)
    per_class = (errors_sorted * grad).sum(dim=2)  # [N, C]
    present = (gts[..., 0] > 0).to(probs.dtype)
    return (per_class * present).sum(dim=1) / present.sum(dim=1).clamp_min(1)


class LovaszSoftmaxLoss(nn.Module):
    """Lovász-softmax loss, a convex surrogate of 1 - IoU averaged over the classes present in the target.
    per_image=False treats the batch as one image; per_image=True averages the per-image losses."""

    def __init__(self, per_image: bool = False, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.per_image, self.ignore_index = per_image, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, c = logits.shape[:2]
        probs = logits.float().softmax(dim=1).reshape(b, c, -1)
        labels, valid = target.reshape(b, -1), target.reshape(b, -1) != self.ignore_index
        if not self.per_image:
            probs = probs.permute(1, 0, 2).reshape(1, c, -1)
            labels, valid = labels.reshape(1, -1), valid.reshape(1, -1)
        return lovasz_softmax(probs, labels, valid).mean()


class CombinedLoss(nn.Module):
    """Weighted sum of losses: sum_k w_k * loss_k(logits, target)."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]):
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.weights = [weight for _, weight, _ in terms]
        self.losses = nn.ModuleList(loss for _, _, loss in terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(logits, target) for w, loss in zip(self.weights, self.losses))

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in zip(self.names, self.weights))


# ---- the loss spec: ce:0.5,lovasz:0.5 -> a module --------------------------------------------------------------------


class LossSpecError(ValueError):
    """A --loss spec that cannot be parsed; the message is shown to the user as one line."""


LOSS_NAMES = ("ce", "ohem", "dice", "tversky", "focal", "lovasz")


def build_loss(
    spec: str, num_classes: int, ignore_index: int = IGNORE_INDEX, class_weights: torch.Tensor | None = None
) -> CombinedLoss:
    """A weighted sum from a spec such as `ce`, `ce:0.7,dice:0.3` or `ce:0.6,lovasz:0.2,focal:0.2`.
    Class weights apply to the cross-entropy term."""
    if class_weights is not None and len(class_weights) != num_classes:
        raise LossSpecError(f"{len(class_weights)} class weights given for {num_classes} classes")
    terms = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in LOSS_NAMES:
            raise LossSpecError(f"invalid --loss {spec!r}: unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise LossSpecError(f"invalid --loss {spec!r}: weight {weight!r} of {name} is not a number") from None
        if not w > 0:
            raise LossSpecError(f"invalid --loss {spec!r}: weight of {name} must be positive")
        loss = {
            "ce": lambda: CrossEntropyLoss(class_weights, ignore_index),
            "ohem": lambda: OhemCrossEntropyLoss(ignore_index=ignore_index),
            "dice": lambda: DiceLoss(ignore_index=ignore_index),
            "tversky": lambda: TverskyLoss(ignore_index=ignore_index),
            "focal": lambda: FocalLoss(ignore_index=ignore_index),
            "lovasz": lambda: LovaszSoftmaxLoss(ignore_index=ignore_index),
        }[name]()
        terms.append((name, w, loss))
    return CombinedLoss(terms)
