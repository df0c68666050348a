import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dataset import IGNORE_INDEX
from evaluate import ConfusionMatrix, evaluate
from losses import CrossEntropyLoss


def test_confusion_matrix_metrics_on_a_hand_made_case():
    # truth 0 0 0 1 1 2 | ignored pixel predicted 1
    target = torch.tensor([0, 0, 0, 1, 1, 2, IGNORE_INDEX])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 1])
    cm = ConfusionMatrix(4)
    cm.update(pred[:4], target[:4])  # two updates accumulate
    cm.update(pred[4:], target[4:])
    expected = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)
    m = cm.compute()
    # IoU = TP / (TP + FP + FN): class 0: 2/3, class 1: 1/(1+1+1), class 2: 1/(1+1+0); class 3 never seen
    assert m["iou"][:3] == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 6)


def test_confusion_matrix_accepts_images_and_skips_out_of_range_targets():
    target = torch.tensor([[[0, 1], [1, 7]]])
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[[0, 1], [0, 0]]]), target)
    assert cm.mat.tolist() == [[1, 0], [1, 1]]
    assert cm.compute()["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)


class Oracle(nn.Module):
    """Predicts the class stored in the image's first channel, so its predictions are known."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return F.one_hot(x[:, 0].long(), self.num_classes).permute(0, 3, 1, 2).float() * 10 + self.dummy


def test_evaluate_reports_perfect_scores_for_an_oracle_and_counts_errors():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    images = target[:, None].float().expand(4, 3, 8, 8).clone()
    loader = DataLoader(list(zip(images, target)), batch_size=2)
    m = evaluate(Oracle(3), loader, CrossEntropyLoss(), torch.device("cpu"), 3)
    assert m["miou"] == 1.0 and m["pixel_acc"] == 1.0 and m["loss"] < 1e-3

    wrong = target.clone()
    wrong[0] = (wrong[0] + 1) % 3  # one image of four entirely wrong
    m = evaluate(
        Oracle(3), DataLoader(list(zip(images, wrong)), batch_size=2), CrossEntropyLoss(), torch.device("cpu"), 3
    )
    assert m["pixel_acc"] == pytest.approx(0.75)
