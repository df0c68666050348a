import argparse
import copy
import csv
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_pair
from PIL import Image

import evaluate
import train_deeplab
import train_deeplab_finetune
from dataset import TransformConfig, build_dataset, split_statistics
from models import load_model

FIXED = ["--batch-size", "4", "--workers", "0", "--no-pretrained", "--epochs", "1"]


def finetune(checkpoint, out, *extra):
    args = train_deeplab_finetune.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--out", str(out), *FIXED, *extra]
    )
    train_deeplab_finetune.main(args)


def train(data, out, *extra) -> float:
    args = ["--data", str(data), "--out", str(out), *FIXED, *extra]
    return train_deeplab.train(train_deeplab.get_args_parser().parse_args(args))


def split_state(state: dict) -> tuple[dict, dict]:
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k: v for k, v in state.items() if k.startswith("classifier.")}
    return backbone, head


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def base_run(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    train(tiny_demo, out)
    return out


def test_freeze_backbone_keeps_every_backbone_tensor_and_trains_the_head(base_run, tmp_path):
    finetune(base_run / "last.pth", tmp_path / "head", "--freeze-backbone")
    before = split_state(torch.load(base_run / "last.pth", weights_only=True)["model"])
    after = split_state(torch.load(tmp_path / "head" / "last.pth", weights_only=True)["model"])
    assert same(before[0], after[0])  # weights and BatchNorm statistics alike
    assert not same(before[1], after[1])
    optimizer = torch.load(tmp_path / "head" / "last.pth", weights_only=True)["optimizer"]
    assert [g["name"] for g in optimizer["param_groups"]] == ["head"]


def test_unfreeze_trains_the_backbone_at_its_own_lr(base_run, tmp_path):
    finetune(base_run / "last.pth", tmp_path / "all", "--unfreeze", "--lr-backbone", "1e-3", "--lr", "0.02")
    checkpoint = torch.load(tmp_path / "all" / "last.pth", weights_only=True)
    before = split_state(torch.load(base_run / "last.pth", weights_only=True)["model"])
    after = split_state(checkpoint["model"])
    assert not same(before[0], after[0]) and not same(before[1], after[1])
    lrs = {g["name"]: g["initial_lr"] for g in checkpoint["optimizer"]["param_groups"]}
    assert lrs == {"backbone": 1e-3, "head": 0.02}


def test_freeze_at_epoch_freezes_from_exactly_that_epoch(tiny_demo, tmp_path, monkeypatch):
    states = []
    save = train_deeplab.write_checkpoints

    def record(state, out, best):
        states.append(copy.deepcopy(state["model"]))
        save(state, out, best)

    monkeypatch.setattr(train_deeplab, "write_checkpoints", record)
    train(tiny_demo, tmp_path / "r", "--epochs", "3", "--freeze-at-epoch", "3")
    (b1, h1), (b2, h2), (b3, h3) = (split_state(s) for s in states)
    assert not same(b1, b2)  # epoch 2 still trains the backbone
    assert same(b2, b3) and not same(h2, h3)  # epoch 3 does not


def test_poly_power_changes_and_warmup_give_the_formula_lrs(tiny_demo, tmp_path):
    out = tmp_path / "r"
    train(tiny_demo, out, "--epochs", "4", "--lr", "0.1", "--poly-power-at", "3:2.0", "--warmup-steps", "3")
    with open(out / "log.csv") as f:
        logged = [float(row["lr"]) for row in csv.DictReader(f)]
    iters, max_iters = 2, 8  # 8 training images, batches of 4
    expected = []
    for epoch in range(1, 5):
        it = (epoch - 1) * iters  # the lr column is the lr of each epoch's first step
        power = 2.0 if epoch >= 3 else 0.9
        expected.append(0.1 * (1 - it / max_iters) ** power * min(1.0, (it + 1) / 3))
    assert logged == pytest.approx(expected, rel=1e-5)


def test_loss_at_switches_the_loss_from_that_epoch(tiny_demo, tmp_path, capsys):
    args = [
        "--data",
        str(tiny_demo),
        "--out",
        str(tmp_path / "r"),
        *FIXED,
        "--epochs",
        "2",
        "--loss-at",
        "2:ce:0.5,lovasz:0.5",
    ]
    train_deeplab.train(train_deeplab.get_args_parser().parse_args(args))
    lines = capsys.readouterr().out.splitlines()
    switch = lines.index("Epoch 2: loss is now ce:0.5,lovasz:0.5")
    assert lines[switch - 1].startswith("Saved best model") or lines[switch - 1].startswith("No improvement")


def test_auto_class_weights_follow_median_frequency_on_a_hand_made_mask(tmp_path, capsys):
    mask = np.array([[100] * 6 + [10000] * 3 + [7100]])  # Trees 6, Sky 3, Landscape 1 pixel
    write_pair(tmp_path / "train" / "Color_Images" / "a.png", tmp_path / "train" / "Segmentation" / "a.png", mask)
    ds = build_dataset(tmp_path, "offroad", "train", TransformConfig(train=False))
    names, pixels = ds.class_map.names, split_statistics(ds.pairs, ds.class_map).pixels
    weights = train_deeplab.load_class_weights(argparse.Namespace(class_weights="auto"), names, pixels, print)
    median = 0.3  # of the frequencies 0.6, 0.3 and 0.1
    assert weights[0].item() == pytest.approx(median / 0.6)
    assert weights[9].item() == pytest.approx(median / 0.3)
    assert weights[8].item() == pytest.approx(median / 0.1)
    assert weights[1].item() == 0
    assert "median frequency" in capsys.readouterr().out
    enet = train_deeplab.load_class_weights(argparse.Namespace(class_weights="enet"), names, pixels, print)
    assert enet[0].item() == pytest.approx(1 / math.log(1.62)) and enet[8].item() == pytest.approx(1 / math.log(1.12))
    assert enet[1].item() == 0 and "ENet" in capsys.readouterr().out

    (tmp_path / "w.txt").write_text("1, 2 3\n4 5 6 7 8 9 10\n")
    from_file = train_deeplab.load_class_weights(
        argparse.Namespace(class_weights=str(tmp_path / "w.txt")), names, pixels, print
    )
    assert from_file.tolist() == [float(v) for v in range(1, 11)]
    (tmp_path / "w.txt").write_text("1 2 3")
    with pytest.raises(train_deeplab.DatasetError, match="3 numbers for 10 classes"):
        weights_file = argparse.Namespace(class_weights=str(tmp_path / "w.txt"))
        train_deeplab.load_class_weights(weights_file, names, pixels, print)


def test_checkpoint_of_another_arch_or_class_count_fails_in_one_line(base_run, tmp_path):
    with pytest.raises(SystemExit) as e:
        finetune(base_run / "best.pth", tmp_path / "x", "--arch", "deeplabv2_resnet101")
    assert "deeplabv3_mobilenet_v3_large" in str(e.value.code) and "\n" not in str(e.value.code)

    for split in ("train", "val"):
        for i in range(2):
            write_pair(
                tmp_path / "f" / split / "images" / f"{i}.png",
                tmp_path / "f" / split / "masks" / f"{i}.png",
                np.arange(64).reshape(8, 8) % 3,
            )
    with pytest.raises(SystemExit) as e:
        finetune(base_run / "best.pth", tmp_path / "y", "--data", str(tmp_path / "f"), "--num-classes", "3")
    assert "10 classes but the data has 3" in str(e.value.code)


def test_downsample_gt_must_match_the_output_stride_and_then_trains(base_run, tmp_path):
    with pytest.raises(SystemExit, match="output stride"):
        finetune(base_run / "best.pth", tmp_path / "x", "--downsample-gt", "8")
    finetune(base_run / "best.pth", tmp_path / "y", "--downsample-gt", "16")
    assert (tmp_path / "y" / "best.pth").is_file()


def test_the_checkpoints_atrous_rates_come_along_unless_it_has_none(base_run, tmp_path):
    checkpoint = torch.load(base_run / "best.pth", weights_only=True)
    for rates, expected in ([6, 12, 18], [6, 12, 18]), (None, [12, 24, 36]):  # None: saved before the flag
        checkpoint["args"] = {k: v for k, v in checkpoint["args"].items() if k != "atrous_rates"}
        if rates:
            checkpoint["args"]["atrous_rates"] = rates
        torch.save(checkpoint, tmp_path / "base.pth")
        out = tmp_path / f"tuned{rates}"
        finetune(tmp_path / "base.pth", out)
        aspp = load_model(out / "last.pth").classifier[0]
        assert [branch[0].dilation[0] for branch in aspp.convs[1:4]] == expected


def test_compare_writes_the_summary_and_every_plot(base_run, tmp_path, capsys):
    finetune(base_run / "best.pth", tmp_path / "head", "--freeze-backbone", "--epochs", "2", "--patience", "0")
    lacking = tmp_path / "lacking"  # a run of another length whose CSV has no lr column
    lacking.mkdir()
    with open(base_run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    with open(lacking / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [c for c in rows[0] if c != "lr"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    report = tmp_path / "report"
    args = ["--compare", str(base_run), str(tmp_path / "head"), str(lacking), "--report", str(report)]
    evaluate.main(evaluate.get_args_parser().parse_args(args))
    names = ["summary.md", "lr_schedule.png", "loss_per_run.png", "loss_all.png", "miou.png", "per_class_iou.png"]
    for name in [*names, "time.png", "tradeoff.png"]:
        assert (report / name).stat().st_size > 0
        if name.endswith(".png"):
            with Image.open(report / name) as im:
                assert im.size[0] >= 400 and im.size[1] >= 300
    summary = (report / "summary.md").read_text().splitlines()
    assert "Trees" in summary[0] and "Sky" in summary[0] and len(summary) == 2 + 3
    head_row = next(line for line in summary if line.startswith("| head |"))
    best = max(float(r["val_mIoU"]) for r in csv.DictReader(open(tmp_path / "head" / "log.csv")))
    assert f"| {best:.4f} |" in head_row
    trainable = int(re.search(r"trainable params (\d+)", capsys.readouterr().out).group(1))
    assert f"| {trainable} |" in head_row
    page = (report / "index.html").read_text()  # the same table, the plots and what each run changed
    assert all(f'src="{name}"' in page for name in names[1:]) and "freeze_backbone=true" in page
    assert page.count("<tr>") == 1 + 3 and f'data-v="{best!r}"' in page and "paired" not in page  # lacking: no .pth


def test_compare_report_bootstraps_each_run_against_the_first_on_the_same_images(base_run, tmp_path):
    report = tmp_path / "report"
    args = ["--compare", str(base_run), str(base_run), "--report", str(report), "--bootstrap", "50", "--workers", "0"]
    evaluate.main(evaluate.get_args_parser().parse_args(args))
    rows = re.findall(r"<tr>(.*?)</tr>", (report / "index.html").read_text())
    assert "paired" in rows[0] and '<td data-v="0.0">0.0000</td><td>[+0.0000, +0.0000]</td>' in rows[2]


def test_without_checkpoint_the_newest_best_pth_under_runs_is_fine_tuned(base_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = train_deeplab_finetune.get_args_parser().parse_args([*FIXED, "--out", "out"])
    with pytest.raises(SystemExit) as e:
        train_deeplab_finetune.main(args)
    assert "train first (python train_deeplab.py)" in str(e.value.code) and "\n" not in str(e.value.code)

    for name, age in (("b", 100), ("a", 50)):  # a is the newer, though b sorts last
        (tmp_path / "runs" / name).mkdir(parents=True)
        shutil.copy(base_run / "best.pth", tmp_path / "runs" / name / "best.pth")
        stamp = time.time() - age
        os.utime(tmp_path / "runs" / name / "best.pth", (stamp, stamp))
    for newest, out in (("a", "out1"), ("b", "out2")):
        args = train_deeplab_finetune.get_args_parser().parse_args([*FIXED, "--out", out, "--unfreeze"])
        train_deeplab_finetune.main(args)
        first = capsys.readouterr().out.splitlines()[0]
        taken = Path("runs") / newest / "best.pth"
        assert first == f"Fine-tuning {taken}, the newest best.pth under runs/ (--checkpoint picks another)"
        assert torch.load(Path(out) / "last.pth", weights_only=True)["args"]["checkpoint"] == str(taken)
        os.utime(tmp_path / "runs" / "b" / "best.pth")  # now b is the newest


def test_aux_loss_trains_an_aux_head_that_evaluation_leaves_out(tiny_demo, tmp_path, capsys):
    best = train(tiny_demo, tmp_path / "r", "--arch", "deeplabv3plus_mobilenet_v3_large", "--aux-loss", "0.5")
    out = capsys.readouterr().out
    aux = 40 * 10 * 9 + 2 * 10 + 10 * 10 + 10  # FCN head on 40 channels: 3x3 conv to 10, BatchNorm, 1x1 to 10 classes
    assert re.search(rf"trainable params \d+ \(\+ aux head {aux}, training only\)", out)
    checkpoint = torch.load(tmp_path / "r" / "best.pth", weights_only=True)
    assert any(k.startswith("aux_classifier.") for k in checkpoint["model"]) and checkpoint["args"]["aux_loss"] == 0.5
    args = ["--checkpoint", str(tmp_path / "r" / "best.pth"), "--workers", "0", "--json", str(tmp_path / "m.json")]
    evaluate.main(evaluate.get_args_parser().parse_args([*args, "--bootstrap", "10"]))
    assert json.loads((tmp_path / "m.json").read_text())["miou"] == pytest.approx(best, abs=1e-12)
