import csv
import json
import re

import pytest
import torch
from conftest import CAMVID

import evaluate
import train_deeplab
from train_deeplab import csv_header, poly_lr_factor

EPOCH_LINE = re.compile(
    r"^Epoch (\d+)/(\d+) \| train loss \d+\.\d{4} \| val loss \d+\.\d{4} \| val mIoU \d\.\d{4} \| pixel acc \d\.\d{4}$"
)


def train_args(data, out, *extra):
    """Small, offline, single-process runs; later flags override these."""
    fixed = ["--data", str(data), "--out", str(out), "--batch-size", "4", "--workers", "0", "--no-pretrained"]
    return train_deeplab.get_args_parser().parse_args([*fixed, "--epochs", "1", *extra])


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_epoch_run(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    best = train_deeplab.train(train_args(tiny_demo, out, "--epochs", "2"))
    return out, best


def test_two_epoch_run_writes_checkpoints_and_log(two_epoch_run, tiny_demo):
    out, best = two_epoch_run
    rows = read_log(out / "log.csv")
    assert list(rows[0].keys()) == csv_header(10) and [r["epoch"] for r in rows] == ["1", "2"]
    assert max(float(r["val_mIoU"]) for r in rows) == pytest.approx(best, abs=1e-6)
    for row in rows:
        assert 0 <= float(row["train_mIoU"]) <= 1 and float(row["Runtime"]) > 0 and 0 <= float(row["data_wait"]) < 1
    for name in ("best.pth", "last.pth"):
        checkpoint = torch.load(out / name, weights_only=True)  # plain tensors and values only
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "args", "class_names"} <= checkpoint.keys()
        assert checkpoint["class_names"][9] == "Sky" and checkpoint["args"]["arch"] == "deeplabv3_mobilenet_v3_large"
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2


def test_evaluating_the_best_checkpoint_reproduces_the_best_val_miou(two_epoch_run, tmp_path, capsys):
    out, best = two_epoch_run
    args = ["--checkpoint", str(out / "best.pth"), "--workers", "0", "--json", str(tmp_path / "m.json")]
    evaluate.main(evaluate.get_args_parser().parse_args(args))
    assert json.loads((tmp_path / "m.json").read_text())["miou"] == pytest.approx(best, abs=1e-12)
    assert f"mIoU {best:.4f} (95% CI" in capsys.readouterr().out


def test_epoch_lines_follow_the_study_format(tiny_demo, tmp_path, capsys):
    # DeepLabV2 has frozen BatchNorm, so with lr 0 nothing changes: epoch 2 is no better and patience 1 stops there
    args = train_args(tiny_demo, tmp_path / "r", "--arch", "deeplabv2_resnet101", "--epochs", "3", "--lr", "0")
    train_deeplab.main(train_deeplab.get_args_parser().parse_args(["--patience", "1"], namespace=args))
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if line.startswith("Epoch ")]
    assert all(EPOCH_LINE.match(line) for line in epochs)
    assert len(epochs) == 2 and "No improvement for 1 epoch(s)" in lines and "Early stopping triggered." in lines
    assert lines[-1].startswith("Best validation mIoU: ")
    assert any(line.startswith("  Per-class IoU: Trees ") for line in lines)
    assert len(read_log(tmp_path / "r" / "log.csv")) == 2


def test_same_seed_gives_identical_metrics_on_cpu(tiny_demo, tmp_path):
    for name in ("x", "y"):
        train_deeplab.train(train_args(tiny_demo, tmp_path / name, "--epochs", "1", "--augment", "--crop", "48", "64"))
    x, y = read_log(tmp_path / "x" / "log.csv"), read_log(tmp_path / "y" / "log.csv")
    for row in (x[0], y[0]):
        row.pop("Runtime"), row.pop("data_wait")
    assert x == y


def test_poly_schedule_and_warmup_follow_the_formula():
    assert poly_lr_factor(0, 100, 0.9) == 1.0
    assert poly_lr_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_lr_factor(99, 100, 2.0) == pytest.approx(0.01**2)
    assert poly_lr_factor(4, 100, 0.9, warmup_steps=10) == pytest.approx(0.5 * (1 - 0.04) ** 0.9)
    assert poly_lr_factor(10, 100, 0.9, warmup_steps=10) == pytest.approx(0.9**0.9)


def test_existing_run_is_never_overwritten(two_epoch_run, tiny_demo):
    out, _ = two_epoch_run
    before = (out / "log.csv").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        train_deeplab.main(train_args(tiny_demo, out, "--epochs", "1"))
    assert (out / "log.csv").read_bytes() == before


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--loss", "ce:0.5,dyce:0.5"], "--loss"),
        (["--crop", "1", "2", "3"], "--crop"),
        (["--batch-size", "1"], "--batch-size"),
    ],
)
def test_bad_flags_fail_in_one_line(tiny_demo, tmp_path, extra, needle):
    args = train_args(tiny_demo, tmp_path / "r", "--epochs", "1", *extra)  # a repeated flag: the last one wins
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(args)
    assert needle in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "r" / "log.csv").exists()


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid is read from ../shared/data/camvid")
def test_one_epoch_on_a_few_camvid_images(tmp_path):
    for split, n in (("train", 8), ("val", 4)):
        for sub in ("images", "masks"):
            (tmp_path / "camvid" / split / sub).mkdir(parents=True)
        for image in sorted((CAMVID / split / "images").iterdir())[:n]:  # links, not copies
            (tmp_path / "camvid" / split / "images" / image.name).symlink_to(image)
            (tmp_path / "camvid" / split / "masks" / image.name).symlink_to(CAMVID / split / "masks" / image.name)
    train_deeplab.train(train_args(tmp_path / "camvid", tmp_path / "run", "--num-classes", "11", "--size", "90", "120"))
    row = read_log(tmp_path / "run" / "log.csv")[0]
    assert "class_10_val" in row and "class_11_val" not in row
    assert 0 < float(row["pixel_acc"]) <= 1 and float(row["train_loss"]) > 0
