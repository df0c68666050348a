import csv
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import png_header_only
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import Cityscapes

import dataset
import evaluate as evaluate_module
from dataset import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, OFFROAD_CLASSES, DatasetError
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
from models import ARCHS, build_model, layout_choice, load_model
from train_deeplab import csv_header


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
            "--json", str(report), "--bootstrap", "50")
    stems = sorted(p.stem for p in (tiny_demo / "val" / "Color_Images").iterdir())
    kinds = ("", "_color", "_overlay", "_gt")
    assert sorted(p.name for p in pictures.iterdir()) == sorted(f"{s}{k}.png" for s in stems for k in kinds)
    with Image.open(pictures / f"{stems[0]}_overlay.png") as over, Image.open(pictures / f"{stems[0]}.png") as raw:
        assert raw.size == (96, 64) and raw.mode == "L"
        assert over.size[0] > 2 * 96 and over.size[1] >= 64  # prediction blend, the ground truth, the legend
    with Image.open(pictures / f"{stems[0]}_gt.png") as gt:  # the labels as the evaluation read them
        labels = np.asarray(gt)
    raw_ids = np.asarray(Image.open(tiny_demo / "val" / "Segmentation" / f"{stems[0]}.png"))
    expected = np.full(raw_ids.shape, IGNORE_INDEX)
    for index, (raw_id, _) in enumerate(OFFROAD_CLASSES):
        expected[raw_ids == raw_id] = index
    assert np.array_equal(labels, expected)
    with Image.open(confusion) as im:
        assert im.size[0] > 300
    numbers = json.loads(report.read_text())
    assert numbers["images"] == 4 and len(numbers["iou"]) == 10 and numbers["miou_ci"][0] <= numbers["miou"]
    assert {"precision", "recall", "share", "pixel_acc", "class_names"} <= numbers.keys()


# ---- prediction and ONNX export ---------------------------------------------------------------------------------


def expected_classes(model: nn.Module, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """argmax and max softmax of the model's logits on an image file, computed here from Pillow's pixels."""
    with Image.open(path) as im:
        rgb = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    x = ((rgb - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])[None]
    with torch.no_grad():
        probs = model.eval()(x)[0].softmax(0)
    return probs.argmax(0).numpy(), probs.max(0).values.numpy()


def test_predicting_a_folder_writes_every_file_with_the_models_argmax(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"a.png": (64, 96), "b.jpg": (64, 96), "deeper/c.png": (50, 70)}  # two sizes, a subfolder
    for name, shape in shapes.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(tmp_path / "in" / name)
    out = tmp_path / "out"
    run_cli("--checkpoint", str(checkpoint), "--predict", str(tmp_path / "in"), "--recursive", "--out", str(out),
            "--save-probs", "--batch-size", "2")
    model = build_model("deeplabv3_mobilenet_v3_large", 10)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    palette = dataset.class_map_of(dataset.offroad_table(), "index").palette
    for name, (h, w) in shapes.items():
        stem = out / Path(name).with_suffix("")
        pred, conf = expected_classes(model, tmp_path / "in" / name)
        with Image.open(f"{stem}.png") as raw, Image.open(f"{stem}_conf.png") as confidence:
            assert raw.mode == "L" and raw.size == (w, h) and np.array_equal(np.asarray(raw), pred), name
            assert np.abs(np.asarray(confidence).astype(int) - np.round(conf * 255)).max() <= 1
        for kind in ("_color", "_overlay"):
            with Image.open(f"{stem}{kind}.png") as picture:
                assert picture.size[0] > w and picture.size[1] >= h  # the picture and its legend beside it
        with Image.open(f"{stem}_color.png") as coloured:  # the class colours of the table, pixel by pixel
            assert np.array_equal(np.asarray(coloured)[:h, :w], palette[pred])


def test_a_phone_photo_is_predicted_upright_at_its_displayed_size(checkpoint, tmp_path):
    """EXIF orientation 6: the sensor's pixels are stored turned; the masks come back as the photo is shown."""
    stored = np.random.default_rng(1).integers(0, 256, (96, 64, 3), dtype=np.uint8)  # 64 wide, 96 high, stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "phone.jpg") as im:
        ImageOps.exif_transpose(im).save(tmp_path / "upright.png")  # Pillow's own turn, as a browser shows it
    run_cli("--checkpoint", str(checkpoint), "--predict", str(tmp_path / "phone.jpg"), "--out", str(tmp_path / "out"))
    model = build_model("deeplabv3_mobilenet_v3_large", 10)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    with Image.open(tmp_path / "out" / "phone.png") as raw:
        assert raw.size == (96, 64)
        assert np.array_equal(np.asarray(raw), expected_classes(model, tmp_path / "upright.png")[0])


def test_prediction_paths_files_patterns_and_their_errors(tmp_path):
    for name in ("x/1.png", "x/2.jpg", "x/notes.txt", "x/sub/3.png", "empty/sub/4.png", "y/1.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = evaluate_module.find_images([str(tmp_path / "x"), str(tmp_path / "x" / "sub" / "*.png")])
    assert [(str(image.relative_to(tmp_path)), str(rel)) for image, rel in found] == [
        ("x/1.png", "1.png"), ("x/2.jpg", "2.jpg"), ("x/sub/3.png", "3.png")
    ]
    pattern = str(tmp_path / "**" / "1.png")
    assert [str(rel) for _, rel in evaluate_module.find_images([pattern])] == ["x/1.png", "y/1.png"]
    for paths, needle in (
        ([str(tmp_path / "x" / "*.bmp")], "matches no image"),
        ([str(tmp_path / "empty")], "holds no images (its subfolders do: add --recursive)"),
        ([str(tmp_path / "nothing.png")], "no such file or folder"),
        ([str(tmp_path / "x" / "1.png"), str(tmp_path / "y" / "1.png")], "would write the same files"),
    ):
        with pytest.raises(DatasetError, match=re.escape(needle)):
            evaluate_module.find_images(paths)


def test_prediction_errors_are_one_line(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    for args in (["--predict", str(tmp_path / "empty")], ["--predict", str(tmp_path / "*.png")]):
        with pytest.raises(SystemExit) as e:
            run_cli("--checkpoint", str(checkpoint), *args, "--out", str(tmp_path / "out"))
        assert str(e.value.code).startswith("error: --predict") and "\n" not in str(e.value.code)


def test_label_ids_of_a_cityscapes_model_are_valid_label_ids(tmp_path):
    torch.manual_seed(0)
    table = dataset.cityscapes_table()
    path = tmp_path / "cityscapes.pth"
    args = {"arch": "deeplabv3_mobilenet_v3_large", "data": None, "layout": "cityscapes", "size": None}
    torch.save({"model": build_model(args["arch"], 19).state_dict(), "args": args, "num_classes": 19,
                "class_names": list(table.names), "class_map": dataset.class_map_of(table, "index").to_dict(),
                "epoch": 0}, path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    run_cli("--checkpoint", str(path), "--predict", str(tmp_path / "f.png"), "--out", str(tmp_path / "train"))
    run_cli("--checkpoint", str(path), "--predict", str(tmp_path / "f.png"), "--out", str(tmp_path / "ids"),
            "--label-ids")
    train_ids = np.asarray(Image.open(tmp_path / "train" / "f.png"))
    label_ids = np.asarray(Image.open(tmp_path / "ids" / "f.png"))
    to_train_id = {c.id: c.train_id for c in Cityscapes.classes if c.train_id not in (255, -1)}  # torchvision's table
    assert set(np.unique(label_ids).tolist()) <= set(to_train_id)
    assert np.array_equal(np.vectorize(to_train_id.get)(label_ids), train_ids)


def test_onnx_export_agrees_with_pytorch_at_two_sizes_and_predicts_the_same(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "model.onnx"
    run_cli("--checkpoint", str(checkpoint), "--export-onnx", str(onnx_file))
    out = capsys.readouterr().out
    sizes = re.findall(r"batch 2 at (\d+x\d+): largest logit difference ([0-9.e+-]+)", out)
    assert [size for size, _ in sizes] == ["64x96", "49x73"] and all(float(d) <= 1e-3 for _, d in sizes)
    assert "passed" in out and "ONNX Runtime" in out.splitlines()[-1]
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    run_cli("--predict", str(image), "--onnx", str(onnx_file), "--out", str(tmp_path / "onnx"))  # no checkpoint
    run_cli("--checkpoint", str(checkpoint), "--predict", str(image), "--out", str(tmp_path / "torch"))
    ours, theirs = (np.asarray(Image.open(tmp_path / kind / "image.png")) for kind in ("torch", "onnx"))
    assert ours.shape == (40, 56) and (ours == theirs).mean() >= 0.999


def test_an_export_that_disagrees_is_removed_and_bad_paths_are_one_line(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "model.onnx"
    forward = evaluate_module.OnnxModel.forward
    monkeypatch.setattr(evaluate_module.OnnxModel, "forward", lambda self, x: forward(self, x) + 0.01)
    with pytest.raises(SystemExit) as e:
        run_cli("--checkpoint", str(checkpoint), "--export-onnx", str(onnx_file))
    assert "disagrees with PyTorch" in str(e.value.code) and not onnx_file.exists()
    (tmp_path / "a_file").write_text("")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])
    for args, needle in (
        (["--checkpoint", str(checkpoint), "--export-onnx", str(tmp_path / "a_file" / "m.onnx")], "a_file is a file"),
        (["--checkpoint", str(corrupt), "--export-onnx", str(onnx_file)], "cannot be loaded safely"),
        (["--predict", str(tmp_path / "a_file"), "--onnx", str(corrupt)], "cannot be loaded by ONNX Runtime"),
    ):
        with pytest.raises(SystemExit) as e:
            run_cli(*args)
        assert str(e.value.code).startswith("error: ") and needle in str(e.value.code), args
        assert "\n" not in str(e.value.code)


def test_comparing_a_checkpoint_with_itself_finds_no_difference(checkpoint, tmp_path, capsys):
    run_cli("--checkpoint", str(checkpoint), "--compare-checkpoint", str(checkpoint), "--bootstrap", "100",
            "--json", str(tmp_path / "m.json"))
    result = json.loads((tmp_path / "m.json").read_text())
    comparison = result["comparison"]
    assert comparison["diff"] == 0 and comparison["ci"] == [0, 0]
    assert comparison["iou_b"] == result["iou"] and comparison["miou_b"] == result["miou"]  # B's classes kept too
    assert "no significant difference" in capsys.readouterr().out


def test_cost_row_of_deeplabv2_at_512x1024(capsys):
    run_cli("--benchmark", "--arch", "deeplabv2_resnet101", "--num-classes", "19", "--size", "512", "1024",
            "--warmup", "0", "--runs", "1", "--batch-size", "1", "--device", "cpu", "--channels-last", "off")
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| deeplabv2_resnet101"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["512x1024", "43,795,724", "43,795,724", "374.66", "373.66"]  # the study's MACs, conv only
    assert float(cells[6]) > 0 and cells[8] == "1 / 1" and "measured on cpu" in out and "float32" in out


def test_training_benchmark_prints_throughput_and_memory(capsys):
    run_cli("--benchmark", "--train", "--arch", "deeplabv3_mobilenet_v3_large", "--num-classes", "3",
            "--size", "32", "32", "--batch-size", "2", "--warmup", "0", "--runs", "1", "--device", "cpu")
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("train: ") and "images/s" in line and "peak memory" in line


def test_cost_table_lists_every_arch(capsys):
    run_cli("--benchmark", "--arch", "all", "--num-classes", "19", "--size", "64", "64",
            "--warmup", "0", "--runs", "1", "--batch-size", "1", "--device", "cpu")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| deeplab")]
    assert [row.split("|")[1].strip() for row in rows] == list(ARCHS)
    for arch, row in zip(ARCHS, rows):
        params = sum(p.numel() for p in build_model(arch, 19).parameters() if p.requires_grad)
        assert row.split("|")[3].strip() == f"{params:,}"


def test_a_missing_onnx_package_is_named_in_one_line(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(SystemExit) as e:
        run_cli("--checkpoint", str(checkpoint), "--export-onnx", str(tmp_path / "m.onnx"))
    assert e.value.code == "error: ONNX needs the package onnxscript: pip install -r requirements.txt"
    assert not (tmp_path / "m.onnx").exists()


def test_the_readme_python_example_runs_and_agrees_with_the_command_line(checkpoint, tiny_demo, tmp_path,
                                                                          monkeypatch):
    """README's "Use from Python" block, run as written (placeholders replaced by real files), against the
    command line's prediction files and --json numbers."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Use from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    frames = sorted((tiny_demo / "val" / "Color_Images").glob("*.png"))
    Image.open(frames[0]).save(tmp_path / "a.jpg", quality=95)
    shutil.copy(frames[1], tmp_path / "b.png")
    monkeypatch.chdir(tmp_path)
    code = code.replace("runs/x/best.pth", str(checkpoint)).replace("path/to/data", str(tiny_demo))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    masks, probs, report, model = namespace["masks"], namespace["probs"], namespace["report"], namespace["model"]
    run_cli("--checkpoint", str(checkpoint), "--predict", "a.jpg", "b.png", "--out", "cli", "--json", "m.json")
    for name, mask in zip(("a", "b"), masks):
        assert mask.dtype == np.uint8 and np.array_equal(np.asarray(Image.open(f"cli/{name}.png")), mask)
    assert probs.shape == (10, *masks[0].shape) and np.allclose(probs.sum(0), 1, atol=1e-4)
    assert np.array_equal(probs.argmax(0), masks[0]) and not model.training
    assert model.class_names == [name for _, name in OFFROAD_CLASSES]
    run_cli("--checkpoint", str(checkpoint), "--json", "m.json")
    cli = json.loads(Path("m.json").read_text())
    for key in ("miou", "pixel_acc", "iou", "miou_ci", "images", "class_names"):
        assert report[key] == pytest.approx(cli[key]), key


def test_predict_takes_paths_pil_images_and_arrays_and_keeps_each_images_size(checkpoint, tmp_path):
    model = load_model(checkpoint)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)]
    Image.fromarray(arrays[0]).save(tmp_path / "x.png")
    from_path, from_pil = evaluate_module.predict(model, [tmp_path / "x.png", Image.fromarray(arrays[1])])
    assert from_path.shape == (40, 56) and from_pil.shape == (33, 47)
    assert np.array_equal(from_path, evaluate_module.predict(model, arrays[0]))
    assert np.array_equal(from_path, expected_classes(model, tmp_path / "x.png")[0])  # the model's own argmax
    with pytest.raises(DatasetError, match="HxWx3 uint8"):
        evaluate_module.predict(model, np.zeros((4, 4, 3), np.float32))


# ---- the HTML report --------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """What a browser would load and show of a report page: its tables (each cell's text and data-v), image
    sources, links, and the tags left open."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self.links, self.open, self.text = [], [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in ("img", "meta", "br", "link"):
            self.open.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append({"text": "", "v": attrs.get("data-v")})
        self.images += [attrs["src"]] if tag == "img" else []
        self.links += [attrs[k] for k in ("href", "src") if k in attrs and tag in ("a", "script", "link")]

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"

    def handle_data(self, data):
        self.text.append(data)
        if self.open and self.open[-1] in ("td", "th"):
            self.tables[-1][-1][-1]["text"] += data


def report_of(checkpoint: Path, out: Path, *extra: str) -> tuple[Page, dict]:
    run_cli("--checkpoint", str(checkpoint), "--report", str(out), "--json", str(out / "m.json"), "--bootstrap", "50",
            *extra)
    page = Page((out / "index.html").read_text())
    assert not page.open  # every tag closed: the page parses
    return page, json.loads((out / "m.json").read_text())


def test_report_shows_the_json_numbers_every_picture_it_names_and_the_worst_images_first(checkpoint, tmp_path):
    page, numbers = report_of(checkpoint, tmp_path / "r", "--report-images", "3")
    rows = page.tables[0][1:]
    assert [r[0]["text"] for r in rows] == numbers["class_names"]
    for row, c in zip(rows, range(len(rows))):
        absent = numbers["share"][c] == 0
        for cell, key in zip(row[1:5], ("iou", "precision", "recall", "share")):
            value = numbers[key][c]
            if (absent and key in ("iou", "recall")) or math.isnan(value):
                assert cell["text"] == "n/a"
            else:
                assert float(cell["v"]) == value and cell["text"] in (f"{value:.4f}", f"{value:.2%}")
        assert int(row[5]["v"]) == numbers["images_per_class"][c]
    assert f"mIoU {numbers['miou']:.4f}" in "".join(page.text)
    assert page.images and all((tmp_path / "r" / src).is_file() for src in page.images)
    assert not [link for link in page.links if "://" in link]  # nothing from the network
    shown = [float(m) for m in re.findall(r"image mIoU (\d\.\d{4})", "".join(page.text))]
    worst = sorted(s for s in numbers["per_image_miou"] if not math.isnan(s))[:3]
    assert shown[:3] == pytest.approx(worst, abs=1e-4) and shown[:3] == sorted(shown[:3])


def constant_checkpoint(tmp_path: Path, data: Path, names: list[str], layout: str = "auto") -> Path:
    """A model that predicts class 0 everywhere, saved as training saves one."""
    model = build_model("deeplabv3_mobilenet_v3_large", len(names))
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(torch.tensor([10.0] + [0.0] * (len(names) - 1)))
    args = {"arch": "deeplabv3_mobilenet_v3_large", "data": str(data), "layout": layout, "size": None}
    table = dataset.class_map_of(dataset.numbered_table(len(names), names), "index")
    path = tmp_path / "constant.pth"
    torch.save({"model": model.state_dict(), "args": args, "num_classes": len(names), "class_names": names,
                "class_map": table.to_dict(), "epoch": 0}, path)
    return path


def test_a_one_image_split_and_a_one_class_model_give_a_page_with_absent_classes_as_n_a(tmp_path):
    from conftest import write_folder

    mask = np.zeros((32, 48), np.uint8)
    mask[:, 24:] = 1  # class 2 never appears
    write_folder(tmp_path / "data", "train", [mask, mask])
    write_folder(tmp_path / "data", "val", [mask])
    names = ["road", "<img src=x onerror=alert(1)>", "sky"]  # a name from somebody's labelmap
    page, numbers = report_of(constant_checkpoint(tmp_path, tmp_path / "data", names), tmp_path / "r")
    assert numbers["images"] == 1 and numbers["iou"][1] == 0.0
    assert [r[1]["text"] for r in page.tables[0][1:]] == [f"{numbers['iou'][0]:.4f}", "0.0000", "n/a"]
    text = (tmp_path / "r" / "index.html").read_text()
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (Debian: apt install chromium)")
def test_the_report_renders_in_a_real_browser_with_the_numbers_a_user_reads(checkpoint, tmp_path):
    _, numbers = report_of(checkpoint, tmp_path / "r", "--report-images", "2")
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600"]
    page = (tmp_path / "r" / "index.html").as_uri()
    shown = subprocess.run([*chromium, "--dump-dom", page], check=True, capture_output=True, text=True, timeout=120)
    rendered = Page(shown.stdout)  # the page as the browser built it, its scripts run
    assert f"mIoU {numbers['miou']:.4f}" in "".join(rendered.text)  # the headline
    rows = {row[0]["text"]: row for row in rendered.tables[0][1:]}
    assert list(rows) == numbers["class_names"]  # every class has its row: none lost to the sortable script
    c = int(np.argmax(numbers["share"]))  # the class of the most pixels: it has an IoU
    assert rows[numbers["class_names"][c]][1]["text"] == f"{numbers['iou'][c]:.4f}"
    shot = tmp_path / "shot.png"
    subprocess.run([*chromium, f"--screenshot={shot}", page], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200) and pixels.std() > 10  # drawn, not blank


# ---- pre-labels and the ranking: predictions back into the tools, the images worth labelling next ----

NO_BACKGROUND, WITH_BACKGROUND = ["sky", "road", "tree", "car"], ["background", "cat", "dog", "bird"]


def oracle_pool(root: Path) -> dict[str, np.ndarray]:
    """Images whose red channel (50 * class, in discs) sets what Oracle predicts, with a space, a non-ASCII
    letter, a subfolder and an EXIF turn in them; the class mask of each, by hand, as the image is displayed."""
    rng, expected = np.random.default_rng(0), {}
    for name, (h, w), turned in (("frame 1.png", (30, 40), False), ("sub dir/Straße.png", (24, 36), False),
                                 ("phone.jpg", (20, 32), True)):
        classes = np.zeros((h, w), np.uint8)
        yy, xx = np.ogrid[:h, :w]
        for _ in range(6):
            y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 7)
            classes[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.integers(0, 4)
        rgb = np.stack([classes * 50, np.full_like(classes, 90), np.full_like(classes, 160)], -1)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        exif[0x0112] = 6 if turned else 1
        Image.fromarray(rgb).save(root / name, exif=exif.tobytes(), **({"quality": 100} if turned else {}))
        with Image.open(root / name) as im:
            shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        expected[str(Path(name).with_suffix("").as_posix())] = (shown[..., 0].astype(float) / 50).round()
    return expected


def pre_labels(tmp_path: Path, names: list[str], **kwargs) -> tuple[Path, dict[str, np.ndarray]]:
    expected = oracle_pool(tmp_path / "pool")
    class_map = dataset.class_map_of(dataset.numbered_table(len(names), names), "index")
    evaluate_module.predict_images(Oracle(len(names)), [str(tmp_path / "pool")], tmp_path / "out", class_map,
                                   recursive=True, pre_label=("cvat", "coco", "label-studio", "labelme"), **kwargs)
    return tmp_path / "out", expected


def by_name(masks: dict[str, np.ndarray], names: list[str]) -> dict:
    """Each image's pixels of each object class (background left out: the tools leave it unlabelled)."""
    return {image: {n: mask == c for c, n in enumerate(names) if n != "background" and (mask == c).any()}
            for image, mask in masks.items()}


@pytest.mark.parametrize("names", [NO_BACKGROUND, WITH_BACKGROUND])
def test_coco_pre_labels_read_by_pycocotools_are_the_predicted_masks_one_region_each(tmp_path, names):
    from pycocotools.coco import COCO

    from annotations import connected_regions

    out, expected = pre_labels(tmp_path, names)
    coco = COCO(str(out / "coco" / "annotations" / "instances_default.json"))
    got = {}
    for image in coco.loadImgs(coco.getImgIds()):
        own = got.setdefault(image["file_name"].rsplit(".", 1)[0], {})
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            bits = coco.annToMask(ann).astype(bool)
            assert connected_regions(bits)[1] == 1 and ann["area"] == bits.sum() and 0 < ann["score"] <= 1
            ys, xs = np.nonzero(bits)  # the box by hand: x, y, width, height of the region's pixels
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            name = coco.loadCats(ann["category_id"])[0]["name"]
            assert not (own.get(name, False) & bits).any()
            own[name] = own.get(name, np.zeros_like(bits)) | bits
        assert (out / "coco" / "images" / "default" / image["file_name"]).is_file()
    assert {i: {n: m.tolist() for n, m in c.items()} for i, c in got.items()} == {
        i: {n: m.tolist() for n, m in c.items()} for i, c in by_name(expected, names).items()}


@pytest.mark.parametrize("names", [NO_BACKGROUND, WITH_BACKGROUND])
def test_cvat_and_coco_pre_labels_read_back_as_the_predicted_masks(tmp_path, names):
    out, expected = pre_labels(tmp_path, names)
    labelmap = (out / "cvat" / "labelmap.txt").read_text().splitlines()
    assert labelmap[:2] == ["# label:color_rgb:parts:actions", "background:0,0,0::"]
    assert len(labelmap) == 2 + len([n for n in names if n != "background"])
    want = {Path(image).name: classes for image, classes in by_name(expected, names).items()}
    for source in ("cvat.zip", "coco"):
        got = {}
        for split in ("default", "val"):  # one subset, "default": a validation split is held out of it
            data = dataset.build_dataset(out / source, "auto", split, dataset.TransformConfig(size=None, train=False))
            for (image, _), (_, mask) in zip(data.pairs, (data[i] for i in range(len(data)))):
                got[image.stem] = {n: (mask == c).numpy() for c, n in enumerate(data.class_map.names)
                                   if n != "background" and (mask == c).any()}
        assert sorted(got) == sorted(want), source
        for image, classes in want.items():
            assert sorted(got[image]) == sorted(classes), (source, image)
            assert all(np.array_equal(got[image][n], classes[n]) for n in classes), (source, image)


@pytest.mark.parametrize("names", [NO_BACKGROUND, WITH_BACKGROUND])
def test_labelme_and_label_studio_pre_labels_decoded_by_hand_are_the_predicted_masks(tmp_path, names):
    import base64
    import io
    import urllib.parse
    import xml.etree.ElementTree as ET

    from annotations import decode_brush_rle

    out, expected = pre_labels(tmp_path, names)
    want = by_name(expected, names)
    for image, classes in want.items():  # LabelMe: each mask shape's PNG placed at its first corner
        document = json.loads((out / "labelme" / f"{image}.json").read_text())
        h, w = document["imageHeight"], document["imageWidth"]
        assert (h, w) == expected[image].shape and (out / "labelme" / image).parent.joinpath(
            document["imagePath"]).is_file() and document["imageData"] is None
        got = {}
        for shape in document["shapes"]:
            (x0, y0), (x1, y1) = shape["points"]
            crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(shape["mask"])))).astype(bool)
            assert shape["shape_type"] == "mask" and crop.shape == (y1 - y0 + 1, x1 - x0 + 1)
            got[shape["label"]] = np.zeros((h, w), bool)
            got[shape["label"]][y0:y1 + 1, x0:x1 + 1] = crop
        assert sorted(got) == sorted(classes) and all(np.array_equal(got[n], classes[n]) for n in classes)
    classes_file = (out / "labelme" / "class_names.txt").read_text().split("\n")
    assert classes_file[:2] == ["__ignore__", "_background_"] and "background" not in classes_file
    tasks = json.loads((out / "label-studio" / "tasks.json").read_text())
    config = ET.fromstring((out / "label-studio" / "labeling_config.xml").read_text())
    brush = config.find("BrushLabels")
    assert [label.get("value") for label in brush] == [n for n in names if n != "background"]
    assert len({label.get("background") for label in brush}) == len(brush)
    for task in tasks:
        path = urllib.parse.unquote(task["data"]["image"].split("?d=")[1])
        image = str(Path(path).relative_to("images").with_suffix("").as_posix())
        assert (out / "label-studio" / path).is_file() and 0 <= task["predictions"][0]["score"] <= 1
        got = {}
        for result in task["predictions"][0]["result"]:
            assert (result["from_name"], result["to_name"]) == (brush.get("name"), brush.get("toName"))
            size = result["original_height"], result["original_width"]
            got[result["value"]["brushlabels"][0]] = decode_brush_rle(result["value"]["rle"], *size)
        assert sorted(got) == sorted(want[image]) and all(np.array_equal(got[n], want[image][n]) for n in got)
    assert len(tasks) == len(want)


def test_an_image_score_is_the_share_of_its_pixels_the_validation_counts_say_are_wrong():
    from evaluate import LabellingScore, reliability_counts

    probs = torch.tensor([[0.95, 0.95, 0.55, 0.3], [0.05, 0.05, 0.45, 0.7]])[:, None, :]  # [C=2, 1, 4 pixels]
    target = torch.tensor([[[0, 1, 0, 1]]])
    counts = reliability_counts(probs[None], target, bins=10)
    assert counts.sum() == 4 and counts[0, 9].tolist() == [1, 1] and counts[0, 5].tolist() == [0, 1]
    assert counts[1, 7].tolist() == [0, 1]
    counts = torch.zeros(2, 10, 2, dtype=torch.int64)
    counts[0, 9] = torch.tensor([10, 90])  # class 0 at 0.9-1.0: 90 of 100 right
    counts[1, 9] = torch.tensor([80, 20])
    scorer = LabellingScore(counts, 2)
    precision = [(90 + 1) / (100 + 2), (20 + 1) / (100 + 2)]
    right = [[(90 + precision[0]) / 101, precision[0]], [(20 + precision[1]) / 101, precision[1]]]  # bins 9, 5
    probs = torch.tensor([[0.97, 0.97, 0.03, 0.55], [0.03, 0.03, 0.97, 0.45]])[:, None, :]
    score, shares = scorer(probs)
    assert score == pytest.approx(1 - (2 * right[0][0] + right[1][0] + right[0][1]) / 4)
    assert shares == pytest.approx([0.75, 0.25])
    assert LabellingScore(None, 2)(probs)[0] == pytest.approx(1 - (0.97 * 3 + 0.55) / 4)


def test_ranking_lists_every_image_with_its_score_and_select_writes_only_the_first(tmp_path):
    from evaluate import LabellingScore

    counts = torch.zeros(4, 10, 2, dtype=torch.int64)
    counts[:, :, 1] = 100
    counts[3, :] = torch.tensor([100, 0])  # class 3 ("car") is always wrong: the more of it, the higher the score
    expected = oracle_pool(tmp_path / "pool")
    class_map = dataset.class_map_of(dataset.numbered_table(4, NO_BACKGROUND), "index")
    evaluate_module.predict_images(Oracle(4), [str(tmp_path / "pool")], tmp_path / "out", class_map, recursive=True,
                                   scorer=LabellingScore(counts, 4), select=1, pre_label=("coco",))
    with open(tmp_path / "out" / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:7] == ["rank", "image", "gain", "distance", "nearest", "beside", "score"]
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    names = [Path(r["image"]).relative_to(tmp_path / "pool").with_suffix("").as_posix() for r in rows]
    car = {image: (mask == 3).mean() for image, mask in expected.items()}
    assert sorted(names) == sorted(expected)
    assert [float(r["car"]) for r in rows] == pytest.approx([car[i] for i in names], abs=1e-6)
    by_score = sorted(rows, key=lambda r: float(r["score"]))
    assert [float(r["car"]) for r in by_score] == sorted(float(r["car"]) for r in rows)
    out, top = tmp_path / "out", names[0]
    written = [p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.relative_to(out).parts[0] != "coco"]
    assert sorted(written) == sorted(f"{top}{kind}.png" for kind in ("", "_color", "_overlay"))
    coco = json.loads((tmp_path / "out" / "coco" / "annotations" / "instances_default.json").read_text())
    assert [i["file_name"].rsplit(".", 1)[0] for i in coco["images"]] == [top]


def plain_costs(pool: np.ndarray, labelled: np.ndarray, order: list[int]) -> list[tuple[float, float, float, int]]:
    """Greedy facility location checked the plain way, along `order`: at each step, the total distance of the pool
    to its nearest labelled or chosen frame (with nothing there, the pool's largest distance) once the step's
    frame is chosen, the smallest such total over every frame left, and the frame's nearest labelled (-1 - i) or
    earlier frame, with its distance."""
    dist = lambda a, b: float(np.sqrt(((a - b) ** 2).sum()))  # noqa: E731
    largest = max(dist(a, b) for a in pool for b in pool)
    centres = [(-1 - i, c) for i, c in enumerate(labelled)]
    cost = lambda chosen: sum(min([dist(p, c) for _, c in chosen], default=largest) for p in pool)  # noqa: E731
    steps, left = [], list(range(len(pool)))
    for i in order:
        best = min(cost(centres + [(j, pool[j])]) for j in left)
        near = min(centres, key=lambda c: dist(pool[i], c[1]), default=(None, None))
        steps.append((cost(centres + [(i, pool[i])]), best, dist(pool[i], near[1]) if centres else math.inf, near[0]))
        centres.append((i, pool[i]))
        left.remove(i)
    return steps


@pytest.mark.parametrize("labelled", [0, 2])
def test_coverage_order_is_greedy_facility_location_checked_the_plain_way(labelled):
    from evaluate import coverage_order

    rng = np.random.default_rng(labelled)
    pool, known = rng.normal(size=(14, 3)), rng.normal(size=(labelled, 3))
    order = coverage_order(torch.tensor(pool, dtype=torch.float32), torch.tensor(known, dtype=torch.float32))
    assert sorted(p.index for p in order) == list(range(14))
    steps = plain_costs(pool, known, [p.index for p in order])
    assert all(cost <= best + 1e-4 for cost, best, _, _ in steps)  # each frame the best there was (ties either)
    assert [p.nearest for p in order] == [near for *_, near in steps]
    assert [p.distance for p in order] == pytest.approx([d for _, _, d, _ in steps], rel=1e-5)
    assert all(a.gain >= b.gain - 1e-6 for a, b in zip(order, order[1:]))  # each frame adds less than the last


def test_coverage_goes_to_the_typical_frames_of_what_is_not_labelled_and_never_twice_to_one_frame():
    from evaluate import coverage_order

    rng = np.random.default_rng(0)
    crowd, group, outlier = rng.normal(0, 0.1, (8, 2)), rng.normal(0, 0.1, (4, 2)) + [6, 0], np.array([[0, 3.0]])
    points = np.concatenate([crowd, group, outlier])
    pool = torch.tensor(points, dtype=torch.float32)
    medoid = int(np.argmin(np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).sum(1)))
    first = coverage_order(pool)
    assert first[0].index == medoid and medoid in range(8)  # the most typical frame of all
    assert first[1].index in range(8, 12) and first[2].index == 12  # the group, then the outlier, which covers less
    covered = coverage_order(pool, torch.tensor([[0.0, 0.0]]))  # a labelled frame in the crowd
    assert covered[0].index in range(8, 12) and covered[0].nearest == -1
    assert covered[0].distance == pytest.approx(float(pool[covered[0].index].norm()), rel=1e-5)
    twins = torch.cat([pool, pool + 1e-6])  # every frame twice: no second copy before every frame has one
    picked = [p.index % len(pool) for p in coverage_order(twins)[: len(pool)]]
    assert sorted(picked) == list(range(len(pool)))


def test_weights_pull_the_coverage_towards_the_frames_that_weigh_more():
    from evaluate import coverage_order

    pool = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1]])
    assert coverage_order(pool)[0].index in (0, 1, 2)
    assert coverage_order(pool, weights=torch.tensor([1.0, 1, 1, 10, 10]))[0].index in (3, 4)


def test_frames_next_to_a_labelled_frame_or_an_earlier_pick_of_their_sequence_come_last():
    from evaluate import Pick, apart, sequence_place

    assert sequence_place("0001TP_006690.png") == ("0001TP_", 6690) and sequence_place("IMG_0042.JPG") == ("IMG_", 42)
    assert sequence_place("frame.png") is None and sequence_place("7.png") == ("", 7)
    names = ["a_1", "a_2", "a_3", "a_5", "b_1", "other", "c_10", "c_20"]  # a_4 is labelled; nothing between c_10, c_20
    files = [Path("pool") / f"{n}.png" for n in names]
    order = [Pick(i, 1.0 / (i + 1), 0.5, None) for i in range(len(files))]
    moved = apart(order, files, [Path("done") / "a_4.png"])
    # by hand: a_1 first; a_2 beside a_1; a_3 and a_5 beside the labelled a_4; b_1, other, c_10 first; c_20 beside c_10
    assert [names[p.index] for p in moved] == ["a_1", "b_1", "other", "c_10", "a_2", "a_3", "a_5", "c_20"]
    assert [p.beside for p in moved] == [None, None, None, None, 0, -1, -1, 6]
    assert [p.gain for p in moved] == [order[p.index].gain for p in moved]  # the rest of each pick kept


def test_select_skips_a_frame_next_to_a_labelled_one_for_the_next_best(tmp_path, capsys):
    pool = tmp_path / "pool"
    for name, green in (("a_2", 252), ("b_1", 255), ("d_1", 249)):  # a_2 the most typical green
        solid(pool / f"{name}.png", (0, green, 0))
    solid(pool / "c_1.png", (0, 0, 255))
    done = solid(tmp_path / "labelled" / "a_1.png", (255, 0, 0))
    run_cli("--predict", str(pool), "--select", "2", "--labelled", str(tmp_path / "labelled"), "--out",
            str(tmp_path / "out"))
    with open(tmp_path / "out" / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    first = [Path(r["image"]).name for r in rows[:2]]
    assert first[0] == "c_1.png" and first[1] in ("b_1.png", "d_1.png")  # not a_2, which plain coverage picks first
    assert sorted(p.name for p in (tmp_path / "out" / "selected").iterdir()) == sorted(first)
    assert Path(rows[-1]["image"]).name == "a_2.png" and rows[-1]["beside"] == str(done)
    assert [r["beside"] for r in rows[:-1]] == ["", "", ""]
    assert "1 beside a labelled or earlier image of their sequence last" in capsys.readouterr().out


def solid(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (30, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), rgb, np.uint8)).save(path)
    return path


def test_select_without_a_model_links_the_images_that_cover_the_pool_best(tmp_path, capsys):
    pool = tmp_path / "pool"
    reds = [solid(pool / f"red{i}.png", (255 - i, 0, 0)) for i in range(4)]
    blues = [solid(pool / "sub" / f"blue{i}.png", (0, 0, 255 - i)) for i in range(2)]
    solid(pool / "green.png", (0, 255, 0))
    run_cli("--predict", str(pool), "--recursive", "--select", "2", "--out", str(tmp_path / "out"))
    picked = sorted(p.relative_to(tmp_path / "out" / "selected").as_posix()
                    for p in (tmp_path / "out" / "selected").rglob("*.png"))
    assert len(picked) == 2 and picked[0].startswith("red") and picked[1].startswith("sub/blue")
    with open(tmp_path / "out" / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["rank", "image", "gain", "distance", "nearest", "beside", "score"] and len(rows) == 7
    assert rows[0]["distance"] == rows[0]["nearest"] == rows[0]["beside"] == rows[0]["score"] == ""
    assert rows[1]["nearest"] == rows[0]["image"] in map(str, reds) and rows[1]["image"] in map(str, blues)
    red, blue = (255 - int(Path(rows[0]["image"]).stem[3:]), 0, 0), (0, 0, 255 - int(Path(rows[1]["image"]).stem[4:]))
    rms = math.sqrt(sum((a - b) ** 2 for a, b in zip(red, blue)) / 3) / 255  # the thumbnails' distance, by hand
    assert float(rows[1]["distance"]) == pytest.approx(rms, rel=1e-4)
    assert "linked the 2 images that best cover the 7" in capsys.readouterr().out


def test_labelled_images_count_as_covered(tmp_path, capsys):
    pool = tmp_path / "pool"
    for i in range(4):
        solid(pool / f"red{i}.png", (255 - i, 0, 0))
    solid(pool / "blue.png", (0, 0, 255))
    done = solid(tmp_path / "labelled" / "red.png", (250, 0, 0))
    run_cli("--predict", str(pool), "--select", "1", "--labelled", str(tmp_path / "labelled"), "--out",
            str(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out" / "selected").iterdir()] == ["blue.png"]
    with open(tmp_path / "out" / "ranking.csv") as f:
        first = next(csv.DictReader(f))
    assert first["nearest"] == str(done) and "labelled already: 1 images, the images of" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run_cli("--predict", str(pool), "--select", "1", "--labelled", str(tmp_path / "nowhere"))
    assert str(e.value.code) == f"error: --labelled {tmp_path / 'nowhere'} does not exist"
    with pytest.raises(SystemExit) as e:
        run_cli("--predict", str(pool), "--select", "1", "--pre-label", "coco", "--out", str(tmp_path / "o2"))
    assert str(e.value.code) == "error: --pre-label needs a model's predictions: give --checkpoint (or --onnx)"


def test_a_checkpoint_counts_its_training_frames_as_labelled_and_a_copy_of_one_comes_last(checkpoint, tiny_demo,
                                                                                        tmp_path, capsys):
    trained = sorted((tiny_demo / "train" / "Color_Images").iterdir())
    pool = tmp_path / "pool"
    pool.mkdir()
    shutil.copy(trained[0], pool / "copy.png")
    for i, image in enumerate(sorted((tiny_demo / "val" / "Color_Images").iterdir())):
        shutil.copy(image, pool / f"new{'abcd'[i]}.png")  # no numbers: no sequence, so apart moves none
    run_cli("--checkpoint", str(checkpoint), "--predict", str(pool), "--select", "1", "--out", str(tmp_path / "out"))
    assert f"labelled already: {len(trained)} frames, split train of {tiny_demo}" in capsys.readouterr().out
    with open(tmp_path / "out" / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert Path(rows[-1]["image"]).name == "copy.png" and rows[-1]["nearest"] == str(trained[0])
    assert float(rows[-1]["distance"]) < 1e-4 and float(rows[0]["distance"]) > 1e-3
    assert Path(rows[0]["nearest"]).parent == trained[0].parent and len(rows) == 5


def test_a_checkpoint_whose_data_is_gone_says_so_and_still_ranks(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state["args"]["data"] = str(tmp_path / "moved")
    torch.save(state, tmp_path / "moved.pth")
    solid(tmp_path / "pool" / "a.png", (10, 20, 30))
    run_cli("--checkpoint", str(tmp_path / "moved.pth"), "--predict", str(tmp_path / "pool"), "--out",
            str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert f"labelled already: 0 frames, none: the checkpoint's --data {tmp_path / 'moved'} cannot be read" in out
    assert "--labelled DIR names them" in out and (tmp_path / "out" / "ranking.csv").is_file()


def test_pre_label_and_select_flags_are_checked_in_one_line(checkpoint, tmp_path, capsys):
    for flags, said in ((["--pre-label", "cvat,yolo"], "unknown format yolo"),
                        (["--select", "0"], "--select: expected a whole number over 0")):
        with pytest.raises(SystemExit) as e:
            evaluate_module.get_args_parser().parse_args(["--checkpoint", str(checkpoint), *flags])
        error = capsys.readouterr().err.strip()
        assert e.value.code == 2 and said in error and "\n" not in error
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "out" / "coco").mkdir(parents=True)  # not ours: never replaced
    (tmp_path / "out" / "coco" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        run_cli("--checkpoint", str(checkpoint), "--predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
                "--pre-label", "coco")
    assert "holds no pre-labels" in str(e.value.code) and (tmp_path / "out" / "coco" / "mine.txt").is_file()


# ---- bad input: one line naming the file or the flag, before any work ----


def test_a_broken_row_of_a_runs_log_is_one_line_naming_it(tmp_path):
    header = ",".join(csv_header(2))
    cells = ",".join(["1"] * len(csv_header(2)))
    for name, last in (("short", "2,0.001,1.5"), ("word", cells.replace("1", "abc", 3)), ("long", cells + ",9")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.csv").write_text(f"{header}\n{cells}\n{last}\n")
        with pytest.raises(SystemExit) as e:
            run_cli("--compare", str(tmp_path / name), "--report", str(tmp_path / "report"))
        message = str(e.value.code)
        assert message.startswith(f"error: {tmp_path / name / 'log.csv'}, line 3: not a row as train_deeplab.py "
                                  "writes it") and "\n" not in message, message


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    missing = str(tmp_path / "no.pth")  # loading it would be the first work: the path check must come before
    for flags, needle in ((["--predict", str(tmp_path), "--out", str(tmp_path / "file")], "--out"),
                          (["--json", str(tmp_path)], "--json"),
                          (["--json", str(tmp_path / "file" / "m.json")], "--json"),
                          (["--report", str(tmp_path / "file")], "--report"),
                          (["--confusion", str(tmp_path / "file" / "c.png")], "--confusion")):
        with pytest.raises(SystemExit) as e:
            run_cli("--checkpoint", missing, *flags)
        assert str(e.value.code).startswith(f"error: {needle} {tmp_path}") and "\n" not in str(e.value.code)


def test_predicting_a_bomb_is_one_line(checkpoint, tmp_path):
    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(SystemExit) as e:
        run_cli("--checkpoint", str(checkpoint), "--predict", str(tmp_path / "bomb.png"), "--out", str(tmp_path / "p"))
    assert str(e.value.code) == (f"error: image {tmp_path / 'bomb.png'} has 400,000,000 pixels, over the limit of "
                                 "89,478,485 (a guard against decompression bombs; --max-pixels 400000000 raises it)")


def test_ctrl_c_is_one_line(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_module, "evaluate_command", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        run_cli("--checkpoint", str(checkpoint))
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--workers", "-1"], ["--sliding-window", "8", "8", "8"],
                                   ["--size", "0"], ["--bootstrap", "-1"], ["--time-limit", "-1"]])
def test_inference_flags_that_mean_nothing_are_refused_when_parsed(flags, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_module.get_args_parser().parse_args(flags)
    error = capsys.readouterr().err.strip()
    assert e.value.code == 2 and error.startswith(f"error: argument {flags[0]}: ") and "\n" not in error


def test_benchmark_train_runtimes_races_both_layouts_and_caches_what_a_run_then_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    run_cli("--benchmark", "--train", "--runtimes", "--arch", "deeplabv3_mobilenet_v3_large", "--num-classes", "3",
            "--size", "32", "48", "--batch-size", "2", "--runs", "1")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| deeplabv3_mobilenet"))
    contiguous, channels_last, ratio, auto = (c.strip() for c in row.strip("|").split("|")[1:])
    c, cl, half = float(contiguous), float(channels_last), 0.005  # each printed to 2 decimals
    assert (cl - half) / (c + half) - half <= float(ratio) <= (cl + half) / (c - half) + half
    assert auto == ("channels_last" if float(channels_last) > float(contiguous) else "contiguous")
    model = build_model("deeplabv3_mobilenet_v3_large", 3)
    faster, why = layout_choice("auto", "deeplabv3_mobilenet_v3_large", torch.device("cpu"), model, (2, 32, 48), True)
    assert faster == (auto == "channels_last") and "raced before" in why and f"{float(channels_last):.2f}" in why


def test_an_inference_size_past_the_pixel_limit_is_one_line(checkpoint, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as e:
        run_cli("--checkpoint", str(checkpoint), "--predict", str(tmp_path / "a.png"), "--size", "20000", "20000",
                "--out", str(tmp_path / "p"))
    assert str(e.value.code).startswith("error: --size 20000 20000 has 400,000,000 pixels, over the limit")
