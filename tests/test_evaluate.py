import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import evaluate as evaluate_module
from dataset import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, OFFROAD_CLASSES
from evaluate import (
    ConfusionMatrix,
    bootstrap_miou,
    compare_verdict,
    evaluate,
    interval,
    iou_from_confusion,
    metrics_from_confusion,
    per_image_confusion,
    predict_logits,
    sliding_window,
)
from losses import CrossEntropyLoss
from models import ARCHS, build_model


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
    """Predicts the class written into the red channel (as 50 * class), so its predictions are known."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        red = (x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255  # undo the normalisation evaluate() applies
        return F.one_hot((red / 50).round().long(), self.num_classes).permute(0, 3, 1, 2).float() * 10 + self.dummy


def test_evaluate_reports_perfect_scores_for_an_oracle_and_counts_errors():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    images = (target[:, None] * 50).to(torch.uint8).expand(4, 3, 8, 8).clone()
    loader = DataLoader(list(zip(images, target)), batch_size=2)
    m = evaluate(Oracle(3), loader, CrossEntropyLoss(), torch.device("cpu"), 3)
    assert m["miou"] == 1.0 and m["pixel_acc"] == 1.0 and m["loss"] < 1e-3

    wrong = target.clone()
    wrong[0] = (wrong[0] + 1) % 3  # one image of four entirely wrong
    m = evaluate(
        Oracle(3), DataLoader(list(zip(images, wrong)), batch_size=2), CrossEntropyLoss(), torch.device("cpu"), 3
    )
    assert m["pixel_acc"] == pytest.approx(0.75)


def test_per_class_precision_recall_and_share_on_a_hand_made_matrix():
    # rows: truth. class 0: 3 true pixels, 2 found; class 1: 1 true pixel, found, plus 1 false positive
    m = metrics_from_confusion(torch.tensor([[2, 1], [0, 1]]))
    assert m["precision"] == pytest.approx([2 / 2, 1 / 2])
    assert m["recall"] == pytest.approx([2 / 3, 1 / 1])
    assert m["share"] == pytest.approx([3 / 4, 1 / 4])


def test_per_image_matrices_sum_to_the_batch_matrix():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 5, 5), generator=g)
    target[0, 0] = IGNORE_INDEX
    pred = torch.randint(0, 4, (3, 5, 5), generator=g)
    per_image = per_image_confusion(pred, target, 4)
    for i in range(3):
        single = ConfusionMatrix(4)
        single.update(pred[i], target[i])
        assert torch.equal(per_image[i], single.mat)
    assert per_image[0].sum() == 20 and per_image[1].sum() == 25


class PerPixel(nn.Module):
    """A 1x1-conv model: no spatial context, so flips, tiles and uniform rescaling commute with it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_flip_tta_of_a_per_pixel_model_equals_the_plain_output():
    x = torch.randn(2, 3, 9, 14)
    model = PerPixel()
    assert torch.allclose(predict_logits(model, x, "flip"), model(x), atol=1e-6)


def test_flip_tta_output_is_mirror_symmetric_on_a_mirror_symmetric_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 5, padding=2))  # random kernels
    half = torch.randn(1, 3, 32, 24)
    x = torch.cat([half, half.flip(-1)], dim=-1)
    with torch.no_grad():
        out = predict_logits(model, x, "flip")
        plain = model(x)
    assert torch.allclose(out, out.flip(-1), atol=1e-5)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)  # the model alone is not symmetric


def test_multi_scale_tta_of_a_per_pixel_model_on_a_uniform_image_equals_the_plain_output():
    x = torch.ones(1, 3, 16, 20) * torch.tensor([0.5, -1.0, 2.0])[:, None, None]
    model = PerPixel()
    assert torch.allclose(predict_logits(model, x, "ms"), model(x), atol=1e-5)


def test_sliding_window_of_one_window_equals_the_plain_output():
    model = build_model("deeplabv3_mobilenet_v3_large", 3).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.allclose(predict_logits(model, x, window=(48, 64), stride=16), model(x), atol=1e-6)


def test_overlapping_and_padded_windows_stitch_back_exactly():
    model, x = PerPixel(), torch.randn(1, 3, 30, 41)
    assert torch.allclose(sliding_window(model, x, (16, 16), 7), model(x), atol=1e-6)
    assert torch.allclose(sliding_window(model, x, (40, 50), 10), model(x), atol=1e-6)  # window larger than image


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (30, 8, 8), generator=g)
    pred = torch.where(torch.rand(30, 8, 8, generator=g) < 0.7, target, torch.randint(0, 3, (30, 8, 8), generator=g))
    mats = per_image_confusion(pred, target, 3)
    point = float(iou_from_confusion(mats.sum(0))[1])
    lo, hi = interval(bootstrap_miou(mats, resamples=500, seed=0)[0])
    assert lo < point < hi and hi - lo < 0.2
    assert interval(bootstrap_miou(mats, resamples=500, seed=0)[0]) == (lo, hi)
    assert interval(bootstrap_miou(mats, resamples=500, seed=1)[0]) != (lo, hi)


def test_paired_comparison_of_a_model_with_itself_and_with_a_better_one():
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 3, (20, 8, 8), generator=g)
    noisy = torch.where(torch.rand(20, 8, 8, generator=g) < 0.6, target, (target + 1) % 3)
    a = per_image_confusion(noisy, target, 3)
    same = compare_verdict(a, a.clone(), 300, 0)
    assert same["diff"] == 0 and same["ci"] == [0, 0] and same["verdict"].startswith("no significant difference")
    better = compare_verdict(a, per_image_confusion(target, target, 3), 300, 0)  # B is perfect on every image
    assert better["verdict"].startswith("B beats A by") and better["share_above_zero"] == 1.0
    assert better["ci"][0] > 0 and better["diff"] == pytest.approx(1 - float(iou_from_confusion(a.sum(0))[1]))


@pytest.fixture(scope="module")
def checkpoint(tiny_demo, tmp_path_factory):
    """An untrained model saved as train_deeplab.py saves one: enough for the command line's outputs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    names = [name for _, name in OFFROAD_CLASSES]
    args = {"arch": "deeplabv3_mobilenet_v3_large", "data": str(tiny_demo), "layout": "auto", "size": None}
    state = build_model(args["arch"], 10).state_dict()
    torch.save({"model": state, "args": args, "num_classes": 10, "class_names": names, "epoch": 0}, path)
    return path


def run_cli(*args):
    evaluate_module.main(evaluate_module.get_args_parser().parse_args([*args, "--workers", "0"]))


def test_pictures_confusion_and_json_are_written(checkpoint, tiny_demo, tmp_path):
    pictures, confusion, report = tmp_path / "pred", tmp_path / "cm.png", tmp_path / "m.json"
    run_cli("--checkpoint", str(checkpoint), "--save-predictions", str(pictures), "--confusion", str(confusion),
            "--json", str(report), "--bootstrap", "50")  # fmt: skip
    stems = sorted(p.stem for p in (tiny_demo / "val" / "Color_Images").iterdir())
    assert sorted(p.name for p in pictures.iterdir()) == sorted(
        f"{s}_{k}.png" for s in stems for k in ("pred", "overlay")
    )
    with (
        Image.open(pictures / f"{stems[0]}_pred.png") as pred,
        Image.open(pictures / f"{stems[0]}_overlay.png") as over,
    ):
        assert pred.size == (96, 64) and over.size == (2 * 96, 64)  # prediction blend, then the ground truth
    with Image.open(confusion) as im:
        assert im.size[0] > 300
    numbers = json.loads(report.read_text())
    assert numbers["images"] == 4 and len(numbers["iou"]) == 10 and numbers["miou_ci"][0] <= numbers["miou"]
    assert {"precision", "recall", "share", "pixel_acc", "class_names"} <= numbers.keys()


def test_predict_writes_pictures_for_unlabelled_images(checkpoint, tiny_demo, tmp_path):
    image = tiny_demo / "val" / "Color_Images" / "0000.png"
    run_cli("--checkpoint", str(checkpoint), "--predict", str(image), "--save-predictions", str(tmp_path))
    with Image.open(tmp_path / "0000_overlay.png") as over:
        assert over.size == (96, 64)  # no ground truth beside it


def test_comparing_a_checkpoint_with_itself_finds_no_difference(checkpoint, tmp_path, capsys):
    run_cli("--checkpoint", str(checkpoint), "--compare-checkpoint", str(checkpoint), "--bootstrap", "100",
            "--json", str(tmp_path / "m.json"))  # fmt: skip
    comparison = json.loads((tmp_path / "m.json").read_text())["comparison"]
    assert comparison["diff"] == 0 and comparison["ci"] == [0, 0]
    assert "no significant difference" in capsys.readouterr().out


def test_cost_row_of_deeplabv2_at_512x1024(capsys):
    run_cli("--benchmark", "--arch", "deeplabv2_resnet101", "--num-classes", "19", "--size", "512", "1024",
            "--warmup", "0", "--runs", "1", "--batch-size", "1", "--device", "cpu")  # fmt: skip
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| deeplabv2_resnet101"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["512x1024", "43,795,724", "43,795,724", "374.66", "373.66"]  # the study's MACs, conv only
    assert float(cells[6]) > 0 and cells[8] == "1 / 1" and "measured on cpu" in out and "float32" in out


def test_training_benchmark_prints_throughput_and_memory(capsys):
    run_cli("--benchmark", "--train", "--arch", "deeplabv3_mobilenet_v3_large", "--num-classes", "3",
            "--size", "32", "32", "--batch-size", "2", "--warmup", "0", "--runs", "1", "--device", "cpu")  # fmt: skip
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("train: ") and "images/s" in line and "peak memory" in line


def test_cost_table_lists_every_arch(capsys):
    run_cli("--benchmark", "--arch", "all", "--num-classes", "19", "--size", "64", "64",
            "--warmup", "0", "--runs", "1", "--batch-size", "1", "--device", "cpu")  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| deeplab")]
    assert [row.split("|")[1].strip() for row in rows] == list(ARCHS)
    for arch, row in zip(ARCHS, rows):
        params = sum(p.numel() for p in build_model(arch, 19).parameters() if p.requires_grad)
        assert row.split("|")[3].strip() == f"{params:,}"
