import math

import pytest
import torch
import torch.nn.functional as F

from dataset import IGNORE_INDEX
from losses import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LossSpecError,
    LovaszSoftmaxLoss,
    OhemCrossEntropyLoss,
    TverskyLoss,
    build_loss,
)

LOSSES = {
    "ce": CrossEntropyLoss,
    "ohem": OhemCrossEntropyLoss,
    "dice": DiceLoss,
    "tversky": TverskyLoss,
    "focal": FocalLoss,
    "lovasz": LovaszSoftmaxLoss,
    "lovasz_per_image": lambda: LovaszSoftmaxLoss(per_image=True),
}


def random_case(b=2, c=4, h=5, w=6, seed=0, ignore_share=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g)
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_share] = IGNORE_INDEX
    return logits, target


def confident(target: torch.Tensor, c: int, right: bool) -> torch.Tensor:
    """Logits of +-20 that put (almost) all probability on the true class, or on the next one."""
    label = target.clamp(max=c - 1) if right else (target.clamp(max=c - 1) + 1) % c
    return F.one_hot(label, c).permute(0, 3, 1, 2).float() * 40 - 20


@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_near_zero_when_confidently_right_and_large_when_wrong(name):
    _, target = random_case(ignore_share=0.0)
    loss = LOSSES[name]()
    right, wrong = loss(confident(target, 4, True), target), loss(confident(target, 4, False), target)
    assert right < 1e-3 and wrong > 0.5


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_flow_and_ignored_pixels_get_none(name):
    logits, target = random_case()
    logits.requires_grad_(True)
    LOSSES[name]()(logits, target).backward()
    ignored = (target == IGNORE_INDEX).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    assert logits.grad[~ignored].abs().max() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_all_ignored_batch_gives_connected_zero(name):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE_INDEX)
    loss = LOSSES[name]()(logits, target)
    assert loss.ndim == 0 and loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


@pytest.mark.parametrize("name", LOSSES)
def test_half_precision_logits_are_computed_in_float32(name):
    logits, target = random_case(b=2, c=3, h=64, w=64)
    loss16 = LOSSES[name]()((logits * 30).half(), target)
    loss32 = LOSSES[name]()((logits * 30).half().float(), target)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-6)


def test_ce_matches_torch_with_and_without_class_weights():
    logits, target = random_case()
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    assert torch.allclose(
        CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    )
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX)
    assert torch.allclose(CrossEntropyLoss(weight)(logits, target), expected)


def dice_by_hand(logits, target, num_classes, tversky=None):
    """Per-class sums written out pixel by pixel."""
    probs = logits.softmax(1)
    losses = []
    for c in range(num_classes):
        tp = fp = fn = 0.0
        present = False
        for b, y, x in (
            (b, y, x) for b in range(target.shape[0]) for y in range(target.shape[1]) for x in range(target.shape[2])
        ):
            t = int(target[b, y, x])
            if t == IGNORE_INDEX:
                continue
            p, g = float(probs[b, c, y, x]), float(t == c)
            present |= g == 1
            tp, fp, fn = tp + p * g, fp + p * (1 - g), fn + (1 - p) * g
        if tversky is None:
            score = 2 * tp / (2 * tp + fp + fn)
        else:
            score = tp / (tp + tversky[0] * fp + tversky[1] * fn)
        losses.append((1 - score) if present else 0.0)
    return sum(losses) / num_classes


def test_ohem_is_the_mean_cross_entropy_of_the_hardest_pixels():
    logits, target = random_case(b=2, c=5, h=8, w=10, ignore_share=0.3)
    valid = target != IGNORE_INDEX
    # per-pixel -log p of the true class, from log_softmax by hand, hardest first
    nll = (-logits.log_softmax(1).gather(1, target.clamp(max=4)[:, None])[:, 0])[valid].sort(descending=True).values
    k = math.ceil(0.25 * target.numel())  # 40 of 160 pixels; 112 or so count
    assert OhemCrossEntropyLoss(0.25)(logits, target).item() == pytest.approx(nll[:k].mean().item(), rel=1e-6)
    # a fraction above the share of counted pixels keeps every one of them: plain cross-entropy
    plain = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert OhemCrossEntropyLoss(0.9)(logits, target).item() == pytest.approx(plain.item(), rel=1e-6)


def test_dice_and_tversky_match_per_pixel_sums_with_absent_classes_counted_as_zero():
    logits, target = random_case(c=5)
    target[target == 4] = 0  # class 4 absent: adds 0, still divides
    assert DiceLoss()(logits, target).item() == pytest.approx(dice_by_hand(logits, target, 5), rel=1e-5)
    tversky = TverskyLoss(alpha=0.3, beta=0.7)(logits, target).item()
    assert tversky == pytest.approx(dice_by_hand(logits, target, 5, (0.3, 0.7)), rel=1e-5)
    assert TverskyLoss(0.5, 0.5)(logits, target).item() == pytest.approx(DiceLoss()(logits, target).item(), rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy_and_alpha_weighs_classes():
    logits, target = random_case()
    assert torch.allclose(FocalLoss(gamma=0)(logits, target), CrossEntropyLoss()(logits, target), atol=1e-6)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    valid = target != IGNORE_INDEX
    logp = logits.log_softmax(1).gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)
    expected = (-alpha[target.clamp(max=3)] * (1 - logp.exp()) ** 2 * logp)[valid].mean()
    assert torch.allclose(FocalLoss(gamma=2, alpha=alpha)(logits, target), expected, atol=1e-6)


def lovasz_reference(probs, labels):
    """Berman et al.'s lovasz_softmax_flat ('present' classes), one class at a time. probs [P, C], labels [P]."""
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        gt_sorted = fg[perm]
        gts = gt_sorted.sum()
        intersection = gts - gt_sorted.cumsum(0)
        union = gts + (1 - gt_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
        losses.append(torch.dot(errors_sorted, jaccard))
    return torch.stack(losses).mean() if losses else torch.tensor(0.0)


def flat_valid(logits, target):
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    keep = labels != IGNORE_INDEX
    return probs[keep], labels[keep]


def test_lovasz_equals_the_per_class_reference():
    logits, target = random_case(b=3, c=6, h=7, w=9, seed=1)
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(
        lovasz_reference(*flat_valid(logits, target)).item(), abs=1e-5
    )
    per_image = torch.stack(
        [lovasz_reference(*flat_valid(logits[i : i + 1], target[i : i + 1])) for i in range(3)]
    ).mean()
    assert LovaszSoftmaxLoss(per_image=True)(logits, target).item() == pytest.approx(per_image.item(), abs=1e-5)


def test_lovasz_handles_a_single_valid_pixel():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), IGNORE_INDEX)
    target[0, 1, 0] = 2
    loss = LovaszSoftmaxLoss()(logits, target)
    p = logits.softmax(1)[0, :, 1, 0]
    assert loss.item() == pytest.approx(1 - p[2].item(), abs=1e-6)  # one pixel: error of the true class
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_build_loss_is_the_weighted_sum_of_its_terms():
    logits, target = random_case()
    combo = build_loss("ce:0.6,lovasz:0.2,focal:0.2", 4)
    expected = (
        0.6 * CrossEntropyLoss()(logits, target)
        + 0.2 * LovaszSoftmaxLoss()(logits, target)
        + 0.2 * FocalLoss()(logits, target)
    )
    assert torch.allclose(combo(logits, target), expected)
    assert torch.allclose(build_loss("ce", 4)(logits, target), CrossEntropyLoss()(logits, target))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weighted = build_loss("ce:0.7,dice:0.3", 4, class_weights=weights)(logits, target)
    assert torch.allclose(weighted, 0.7 * CrossEntropyLoss(weights)(logits, target) + 0.3 * DiceLoss()(logits, target))


@pytest.mark.parametrize("spec", ["", "ce:x", "cross:1", "ce:0.5,dice:-1", "ce:0"])
def test_invalid_spec_raises_a_clear_error(spec):
    with pytest.raises(LossSpecError, match="--loss"):
        build_loss(spec, 4)
