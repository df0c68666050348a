import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, write_folder

import dataset
import evaluate
import models
import train_deeplab
import train_deeplab_finetune
from dataset import make_demo
from models import ARCHS, memory_format_of
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
    counts = torch.load(out / "best.pth", weights_only=True)["val_reliability"]  # [C, bins, wrong/right]
    pixel_acc = json.loads((tmp_path / "m.json").read_text())["pixel_acc"]
    assert counts.shape == (10, 10, 2) and float(counts[..., 1].sum() / counts.sum()) == pytest.approx(pixel_acc)


def test_epoch_lines_follow_the_study_format(tiny_demo, tmp_path, capsys):
    # DeepLabV2 has frozen BatchNorm, so with lr 0 nothing changes: epoch 2 is no better and patience 1 stops there
    args = train_args(tiny_demo, tmp_path / "r", "--arch", "deeplabv2_resnet101", "--epochs", "3", "--lr", "0",
                      "--channels-last", "off")
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


def test_low_res_epochs_train_on_half_size_crops_then_on_full_size_ones(tiny_demo, tmp_path, monkeypatch, capsys):
    seen = []  # the batch shapes of each training epoch
    original = train_deeplab.train_one_epoch

    def recording(net, criterion, optimizer, scheduler, scaler, loader, *rest):
        seen.append({tuple(image.shape[-2:]) for image, _ in loader})  # what this epoch's batches are made of
        return original(net, criterion, optimizer, scheduler, scaler, loader, *rest)

    monkeypatch.setattr(train_deeplab, "train_one_epoch", recording)
    train_deeplab.train(train_args(tiny_demo, tmp_path / "r", "--epochs", "3", "--crop", "48", "64",
                                   "--low-res-epochs", "2"))
    assert seen == [{(24, 32)}, {(24, 32)}, {(48, 64)}]
    assert "Epoch 3: training at full resolution from now on (epochs 1-2 at half)" in capsys.readouterr().out


LV = "ce:0.5,lovasz:0.5"


@pytest.mark.parametrize(
    "flags, optimizer, lr, weight_decay, loss",
    [
        (["--data", "D", "--no-pretrained"], "adamw", 1e-3, 0.01, LV),  # from scratch: the CamVid recipe
        ([], "adamw", 1e-3, 0.01, LV),  # the demo trains from scratch too
        (["--data", "D"], "sgd", 0.01, 5e-4, "ce"),  # ImageNet weights: SGD fine-tuning
        (["--data", "D", "--init", "w.pth"], "sgd", 0.01, 5e-4, "ce"),
        (["--data", "D", "--no-pretrained", "--arch", "deeplabv2_resnet101"], "sgd", 2.5e-4, 5e-4, "ce"),
        (["--data", "D", "--no-pretrained", "--optimizer", "sgd", "--loss", "ce"], "sgd", 0.05, 5e-4, "ce"),  # kept
        (["--data", "D", "--no-pretrained", "--lr", "3e-4", "--weight-decay", "0.05"], "adamw", 3e-4, 0.05, LV),
    ],
)
def test_optimizer_and_loss_defaults_follow_how_the_model_starts(flags, optimizer, lr, weight_decay, loss):
    args = train_deeplab.get_args_parser().parse_args(flags)
    train_deeplab.resolve_defaults(args)
    assert (args.optimizer, args.lr, args.weight_decay, args.loss) == (optimizer, lr, weight_decay, loss)


START_FLAGS = {"scratch": ["--no-pretrained"], "imagenet": ["--pretrained"], "init": ["--init", "w.pth"],
               "checkpoint": ["--no-pretrained"]}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("start", START_FLAGS)
@pytest.mark.parametrize("optimizer", [None, "sgd", "adamw"])
def test_every_arch_and_start_resolves_to_its_row_of_the_recipe_table(arch, start, optimizer):
    flags = ["--data", "D", "--arch", arch, *START_FLAGS[start], *(["--optimizer", optimizer] if optimizer else [])]
    args = train_deeplab.get_args_parser().parse_args(flags)
    train_deeplab.resolve_defaults(args, checkpoint={"model": {}} if start == "checkpoint" else None)
    row = train_deeplab.RECIPES[("deeplabv2" if arch.startswith("deeplabv2") else "deeplabv3", start)]
    which = ("sgd", "adamw").index(optimizer or row.optimizer)
    assert args.optimizer == (optimizer or row.optimizer) and args.loss == row.loss
    assert (args.lr, args.weight_decay, args.head_lr_mult) == (row.lr[which], row.weight_decay[which], row.head_lr_mult)


def test_each_flags_help_names_every_value_the_recipe_table_holds_for_it():
    helps = {action.dest: action.help for action in train_deeplab.get_args_parser()._actions}
    for row in train_deeplab.RECIPES.values():
        for setting in ("optimizer", "lr", "weight_decay", "loss", "head_lr_mult"):
            value = getattr(row, setting)
            for v in value if isinstance(value, tuple) else (value,):
                assert (f"{v:g}" if isinstance(v, float) else v) in helps[setting], (setting, v)


def test_the_run_says_what_the_recipe_gave_it_and_what_the_flags_changed():
    args = train_deeplab.get_args_parser().parse_args(["--data", "D", "--no-pretrained", "--lr", "0.002"])
    line = train_deeplab.resolve_defaults(args)
    assert line == ("recipe: optimizer adamw, lr 0.002, weight decay 0.01, loss ce:0.5,lovasz:0.5, head lr x1: "
                    "train_deeplab.RECIPES for deeplabv3 from scratch, but --lr as given")
    flags = ["--data", "D", "--arch", "deeplabv2_resnet101", "--no-pretrained"]
    args = train_deeplab.get_args_parser().parse_args(flags)
    assert train_deeplab.resolve_defaults(args).startswith("recipe: optimizer sgd, lr 0.00025, weight decay 0.0005, "
                                                          "loss ce, head lr x10: ")


def test_fine_tuning_a_checkpoint_defaults_to_cross_entropy():
    args = train_deeplab.get_args_parser().parse_args(["--data", "D", "--no-pretrained"])
    train_deeplab.resolve_defaults(args, checkpoint={"model": {}})
    assert (args.optimizer, args.loss) == ("sgd", "ce")


def test_pretrained_loads_exactly_the_imagenet_weights_in_torchs_cache(tiny_demo, tmp_path, monkeypatch):
    """The user's main path, --pretrained: the backbone starts as the file torchvision's cache holds (here one of
    the right shapes and random values, put where TORCH_HOME says; nothing is downloaded)."""
    from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(7)
    shapes = mobilenet_v3_large().state_dict()
    cached = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in shapes.items()}
    url = MobileNet_V3_Large_Weights.IMAGENET1K_V1.url
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    args = train_args(tiny_demo, tmp_path / "run", "--pretrained", "--lr", "0", "--channels-last", "off")
    train_deeplab.train(args)  # lr 0: the weights stay as loaded
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    backbone = {k[len("backbone."):]: v for k, v in saved.items() if k.startswith("backbone.")}
    parameters = [k for k in backbone if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(parameters) > 100 and args.pretrained
    assert all(torch.equal(backbone[k], cached[f"features.{k}"]) for k in parameters)


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
        (["--batch-size", "1"], "--batch-size"),
        (["--poly-power-at", "2:-1"], "--poly-power-at '2:-1': expected a number 0 or more"),
        (["--ema", "2", "--freeze-backbone"], "drop --ema, or --freeze-backbone"),
        (["--ema", "2", "--freeze-at-epoch", "2"], "drop --ema, or --freeze-backbone"),
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


REPO = Path(__file__).resolve().parents[1]


def script(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def metrics_of(log: Path) -> list[dict]:
    rows = read_log(log)
    for row in rows:
        row.pop("Runtime"), row.pop("data_wait")
    return rows


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_demo, tmp_path):
    flags = ["--data", str(tiny_demo), "--batch-size", "4", "--workers", "2", "--no-pretrained", "--epochs", "4",
             "--size", "128", "192", "--crop", "96", "--scale", "0.75", "1.5", "--augment",
             "--patience", "0"]
    whole = script("train_deeplab.py", *flags, "--out", str(tmp_path / "whole"))
    assert whole.wait(timeout=240) == 0, whole.stderr.read()

    killed = script("train_deeplab.py", *flags, "--out", str(tmp_path / "killed"))
    last, deadline = tmp_path / "killed" / "last.pth", time.time() + 240
    while not last.exists() and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert torch.load(last, weights_only=True)["epoch"] < 4  # it really was cut short

    resumed = script("train_deeplab.py", "--resume", str(last))
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()
    assert "Resuming at epoch" in resumed.stdout.read()
    assert metrics_of(tmp_path / "killed" / "log.csv") == metrics_of(tmp_path / "whole" / "log.csv")
    a = torch.load(tmp_path / "whole" / "best.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "best.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_run_validates_exactly_like_one_process(tmp_path):
    data = make_demo(tmp_path / "demo", seed=1, splits={"train": 8, "val": 5}, size=(64, 96))  # 5: shards of 3 and 2
    run = script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_deeplab.py",
                 "--data", str(data), "--out", str(tmp_path / "ddp"), "--batch-size", "2", "--workers", "0",
                 "--no-pretrained", "--epochs", "2", "--device", "cpu")
    assert run.wait(timeout=240) == 0, run.stderr.read()
    out = run.stdout.read()
    assert out.count("Epoch 1/2 |") == 1 and "x 2 |" in out  # process 0 alone prints
    best = torch.load(tmp_path / "ddp" / "best.pth", weights_only=True)["best_miou"]
    assert len(read_log(tmp_path / "ddp" / "log.csv")) == 2
    args = ["--checkpoint", str(tmp_path / "ddp" / "best.pth"), "--workers", "0", "--json", str(tmp_path / "m.json")]
    evaluate.main(evaluate.get_args_parser().parse_args([*args, "--bootstrap", "10"]))
    assert json.loads((tmp_path / "m.json").read_text())["miou"] == best


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoints(tiny_demo, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_deeplab.build_loss

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)

        class NaNAtStep4(torch.nn.Module):  # epoch 1: calls 1-2 train, 3 validates; call 4 is epoch 2's first step
            def forward(self, logits, target):
                calls["n"] += 1
                value = loss(logits, target)
                return value * float("nan") if calls["n"] == 4 else value

        return NaNAtStep4()

    monkeypatch.setattr(train_deeplab, "build_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(tiny_demo, tmp_path / "r", "--epochs", "3"))
    assert "non-finite loss at epoch 2, step 1 of 2" in str(e.value.code) and "\n" not in str(e.value.code)
    last = torch.load(tmp_path / "r" / "last.pth", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())

    calls["n"] = 0
    train_deeplab.main(train_args(tiny_demo, tmp_path / "s", "--epochs", "2", "--skip-nonfinite"))
    last = torch.load(tmp_path / "s" / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_out_of_memory_suggests_a_smaller_batch(tiny_demo, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_deeplab, "train_one_epoch", oom)
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(tiny_demo, tmp_path / "r"))
    assert "smaller --batch-size" in str(e.value.code)


def test_truncated_image_is_named_in_one_line_even_from_a_worker(tiny_demo, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(tiny_demo, broken)
    image = broken / "train" / "Color_Images" / "0003.png"
    image.write_bytes(image.read_bytes()[:300])  # a valid header, then the data stops
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(broken, tmp_path / "r", "--workers", "1"))
    assert str(e.value.code).startswith("error: cannot read image") and "0003.png" in str(e.value.code)
    assert "\n" not in str(e.value.code) and "Traceback" not in str(e.value.code)


def test_unknown_choices_are_one_line_errors(capsys):
    for flag, value in (("--arch", "unet"), ("--layout", "pascal")):
        with pytest.raises(SystemExit) as e:
            train_deeplab.get_args_parser().parse_args([flag, value])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: argument {flag}") and "\n" not in err


def test_crop_larger_than_the_images_is_padded_and_ignored(tiny_demo, tmp_path):
    train_deeplab.train(train_args(tiny_demo, tmp_path / "r", "--crop", "80", "120"))  # images are 64x96
    row = read_log(tmp_path / "r" / "log.csv")[0]
    assert 0 <= float(row["train_mIoU"]) <= 1 and float(row["train_loss"]) > 0


def binary_dataset(root: Path, high: int = 255) -> Path:
    masks = []
    for i in range(4):
        mask = np.zeros((32, 48), np.uint8)
        mask[4 + i : 20 + i, 8 : 30 + 2 * i] = high
        masks.append(mask)
    write_folder(root, "train", masks)
    return write_folder(root, "val", masks[:2])


def test_binary_masks_train_255_as_the_foreground_not_as_ignore(tmp_path, capsys):
    root = binary_dataset(tmp_path / "data")
    train_deeplab.train(train_args(root, tmp_path / "r", "--num-classes", "2"))
    out = capsys.readouterr().out
    assert "masks: binary, 2 classes from binary masks (0 and 255)" in out
    row = read_log(tmp_path / "r" / "log.csv")[0]
    assert row["class_1_val"] != "nan"  # the foreground is evaluated: it was read as a class
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(root, tmp_path / "s", "--num-classes", "11"))
    message = str(e.value.code)
    assert "hold only 0 and 255, and 255 is read as ignore" in message and "\n" not in message
    assert not (tmp_path / "s" / "log.csv").exists()


def test_training_refuses_one_class_and_warns_about_classes_it_can_never_learn(tmp_path, capsys):
    one = write_folder(tmp_path / "one", "train", [np.zeros((16, 16), np.uint8)] * 4)
    write_folder(one, "val", [np.zeros((16, 16), np.uint8)] * 2)
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(one, tmp_path / "r", "--num-classes", "3"))
    assert "has only class 'class_0' in its masks" in str(e.value.code) and "\n" not in str(e.value.code)

    two = write_folder(tmp_path / "two", "train", [np.arange(256).reshape(16, 16) % 2] * 4)
    write_folder(two, "val", [np.arange(256).reshape(16, 16) % 2] * 2)
    train_deeplab.train(train_args(two, tmp_path / "s", "--num-classes", "3"))
    out = capsys.readouterr().out
    assert "warning: class 'class_2' never appears in split train" in out and "never be learned" in out


def test_colour_masks_train_and_evaluate_from_the_checkpoint_alone(tmp_path, capsys):
    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    ids = [np.add.outer(np.arange(32) // 11, np.arange(48) // 16 + i) % 3 for i in range(6)]
    root = write_folder(tmp_path / "data", "train", [palette[m] for m in ids[:4]])
    write_folder(root, "val", [palette[m] for m in ids[4:]])
    table = tmp_path / "classes.csv"
    table.write_text("name,r,g,b\nred,200,30,30\ngreen,30,200,30\nblue,30,30,200\n")
    best = train_deeplab.train(train_args(root, tmp_path / "r", "--classes", str(table)))
    assert "masks: colour, 3 classes from classes.csv" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "r" / "best.pth", weights_only=True)
    assert checkpoint["class_map"]["encoding"] == "colour" and checkpoint["class_map"]["palette"] == palette.tolist()
    finetune = ["--checkpoint", str(tmp_path / "r" / "best.pth"), "--out", str(tmp_path / "f"), "--workers", "0"]
    train_deeplab_finetune.main(train_deeplab_finetune.get_args_parser().parse_args([*finetune, "--epochs", "1"]))
    assert "masks: colour, 3 classes from classes.csv" in capsys.readouterr().out  # the table comes along
    table.unlink()  # evaluation reads the masks with the checkpoint's own table
    args = ["--checkpoint", str(tmp_path / "r" / "best.pth"), "--workers", "0", "--json", str(tmp_path / "m.json")]
    evaluate.main(evaluate.get_args_parser().parse_args([*args, "--bootstrap", "10"]))
    assert json.loads((tmp_path / "m.json").read_text())["miou"] == pytest.approx(best, abs=1e-12)


def test_downsample_gt_follows_the_stride_of_the_logits():
    parse = lambda *flags: train_deeplab.get_args_parser().parse_args(["--no-pretrained", *flags])  # noqa: E731
    args = parse("--arch", "deeplabv3plus_resnet50", "--downsample-gt", "16")
    with pytest.raises(train_deeplab.ModelError, match=r"output stride 16 \(4\)"):  # behind the decoder: stride 4
        train_deeplab.resolve_defaults(args)
    args = parse("--arch", "deeplabv3_resnet50", "--output-stride", "16", "--downsample-gt", "16")
    train_deeplab.resolve_defaults(args)
    assert args.output_stride == 16
    args = parse("--arch", "deeplabv3plus_resnet101")
    train_deeplab.resolve_defaults(args)
    assert args.output_stride == 16  # the paper's training stride is the default


def test_the_args_keep_the_atrous_rates_the_model_is_built_with():
    parse = lambda *flags: train_deeplab.get_args_parser().parse_args(["--no-pretrained", *flags])  # noqa: E731
    cases = [((), [12, 24, 36]), (("--atrous-rates", "6", "12", "18"), [6, 12, 18]),
             (("--arch", "deeplabv3plus_resnet50"), [6, 12, 18]), (("--arch", "deeplabv2_resnet101"), None)]
    for flags, rates in cases:
        args = parse(*flags)
        train_deeplab.resolve_defaults(args)
        assert args.atrous_rates == rates  # a list, as the checkpoint's args keep it
    with pytest.raises(train_deeplab.ModelError, match="--atrous-rates"):
        train_deeplab.resolve_defaults(parse("--arch", "deeplabv2_resnet101", "--atrous-rates", "6", "12", "18"))


def test_tensorboard_holds_the_logs_numbers_per_step_points_and_validation_pictures(tiny_demo, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    train_deeplab.train(train_args(tiny_demo, out, "--epochs", "2", "--tensorboard", "--batch-size", "2"))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars, log = events.Tags()["scalars"], read_log(out / "log.csv")
    for tag, column in (("mIoU/val", "val_mIoU"), ("loss/train", "train_loss"), ("pixel_acc/val", "pixel_acc"),
                        ("time/data_wait", "data_wait"), ("val_iou/Sky", "class_9_val")):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [1, 2]
        assert [p.value for p in points] == pytest.approx([float(r[column]) for r in log], rel=1e-4, abs=1e-4)
    steps = [p.step for p in events.Scalars("train/loss_per_step")]
    assert steps == list(range(0, 8, 20)) + list(range(4, 8, 20))  # 4 steps an epoch, one point every 20 steps
    assert "train/lr_per_step" in scalars and len(events.Tags()["images"]) == 4  # the first 4 validation images
    picture = events.Images(events.Tags()["images"][0])[-1]
    assert (picture.width, picture.height) == (3 * 96, 64)  # image | ground truth | prediction


def test_tensorboard_without_the_package_is_one_line(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(tiny_demo, tmp_path / "r", "--tensorboard"))
    assert str(e.value.code) == "error: --tensorboard needs the tensorboard package: pip install tensorboard"
    assert not (tmp_path / "r" / "log.csv").exists()


# ---- faults: a kill at any instant, a full disk, Ctrl-C, a folder that holds a run ----


class Killed(BaseException):
    """A SIGKILL at a chosen instant, simulated: nothing after it runs, and no handler in the code catches it."""


def epochs_of(out: Path) -> dict[str, int]:
    """The epoch of each whole checkpoint in `out`: what a kill at this instant would leave."""
    return {p.name: torch.load(p, weights_only=True)["epoch"] for p in out.glob("*.pth")}


def test_a_kill_at_any_instant_of_saving_leaves_best_pth_and_a_checkpoint_to_resume(tmp_path, monkeypatch):
    out = tmp_path
    train_deeplab.write_checkpoints({"epoch": 1, "w": torch.zeros(4)}, out, best=True)
    instants = []
    for name in ("save", "replace"):  # before each step of the write, and after the last, what is on disk
        module, real = (torch, torch.save) if name == "save" else (train_deeplab.os, train_deeplab.os.replace)
        monkeypatch.setattr(module, name, lambda *a, real=real: (instants.append(epochs_of(out)), real(*a))[1])
    monkeypatch.setattr(train_deeplab, "link_or_copy", lambda a, b, real=train_deeplab.link_or_copy: (
        instants.append(epochs_of(out)), real(a, b)))
    train_deeplab.write_checkpoints({"epoch": 2, "w": torch.ones(4)}, out, best=True)
    instants.append(epochs_of(out))
    assert len(instants) == 5 and instants[-1] == {"best.pth": 2, "last.pth": 2}
    for left in instants:  # never a last.pth of the improved epoch beside an older best.pth
        assert left["best.pth"] in (1, 2) and left["last.pth"] in (1, 2)
        assert left["last.pth"] == 1 or left["best.pth"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["best.pth", "last.pth"]


@pytest.mark.parametrize("kill_at", ["last.pth of epoch 2", "log row of epoch 1"])
def test_killed_between_best_and_last_or_before_the_log_row_resumes_to_the_uninterrupted_run(
        two_epoch_run, tiny_demo, tmp_path, monkeypatch, kill_at):
    whole, _ = two_epoch_run
    real_replace, real_append = train_deeplab.os.replace, train_deeplab.append_log

    def replace(a, b):  # epoch 2's best.pth (if it improved) is in place, its last.pth not yet
        if Path(b).name == "last.pth" and kill_at.startswith("last") and torch.load(a)["epoch"] == 2:
            raise Killed
        real_replace(a, b)

    def append(log, row, num_classes):  # epoch 1's checkpoints are written, its log row not yet
        if kill_at.startswith("log") and row[0] == "1":
            raise Killed
        real_append(log, row, num_classes)

    monkeypatch.setattr(train_deeplab.os, "replace", replace)
    monkeypatch.setattr(train_deeplab, "append_log", append)
    out = tmp_path / "r"
    with pytest.raises(Killed):
        train_deeplab.train(train_args(tiny_demo, out, "--epochs", "2"))
    monkeypatch.undo()
    assert epochs_of(out)["last.pth"] == 1 and (out / "best.pth").is_file()
    train_deeplab.main(train_deeplab.get_args_parser().parse_args(["--resume", str(out / "last.pth")]))
    assert metrics_of(out / "log.csv") == metrics_of(whole / "log.csv")
    a = torch.load(whole / "best.pth", weights_only=True)["model"]
    b = torch.load(out / "best.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_is_one_line_and_leaves_the_previous_checkpoint_whole(tiny_demo, tmp_path, monkeypatch):
    out, real_save, before = tmp_path / "r", torch.save, []

    def full(obj, path):  # epoch 2: what torch.save does when the disk fills, part of the file and a bare failure
        if obj["epoch"] == 1:
            return real_save(obj, path)
        before.append((out / "last.pth").read_bytes())
        Path(path).write_bytes(b"PK" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/12: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(dataset.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(tiny_demo, out, "--epochs", "2"))
    monkeypatch.undo()
    assert str(e.value.code) == f"error: cannot write {out / 'last.pth'}: no space left on device (0 MiB free)"
    assert (out / "last.pth").read_bytes() == before[0] and not list(out.glob("*.tmp"))
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1


def test_ctrl_c_is_one_line_with_the_resume_command(tiny_demo, tmp_path, monkeypatch, capsys):
    real = train_deeplab.begin_epoch

    def interrupt(run, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(run, epoch)

    monkeypatch.setattr(train_deeplab, "begin_epoch", interrupt)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(tiny_demo, out, "--epochs", "3"))
    error = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "\n" not in error and error.endswith(f"--resume {out / 'last.pth'}")
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("held, needle", [
    (["best.pth"], "holds best.pth of an earlier run but no last.pth to resume from"),
    (["last.pth"], "already holds a run (last.pth); continue it with --resume"),
    (["log.csv"], "holds log.csv of an earlier run but no last.pth"),
])
def test_a_folder_holding_any_part_of_a_run_is_never_overwritten(tiny_demo, tmp_path, held, needle):
    out = tmp_path / "r"
    out.mkdir()
    for name in held:
        (out / name).write_bytes(b"mine")
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(tiny_demo, out))
    assert needle in str(e.value.code) and all((out / name).read_bytes() == b"mine" for name in held)


def test_an_out_that_is_a_file_or_under_one_is_one_line_before_any_work(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.setattr(train_deeplab, "build_loaders", lambda *a: pytest.fail("work began"))
    (tmp_path / "file").write_text("")
    for out, needle in ((tmp_path / "file", "is no folder"), (tmp_path / "file" / "r", "file is a file")):
        with pytest.raises(SystemExit) as e:
            train_deeplab.main(train_args(tiny_demo, out))
        assert needle in str(e.value.code) and "\n" not in str(e.value.code)


def test_an_unwritable_out_is_one_line_before_any_work(tiny_demo, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dataset.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(train_deeplab, "build_loaders", lambda *a: pytest.fail("work began"))
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(tiny_demo, tmp_path / "ro" / "r"))
    assert str(e.value.code) == f"error: --out {tmp_path / 'ro' / 'r'}: cannot write in {tmp_path} (Permission denied)"


def test_a_validation_split_with_no_labelled_pixel_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train_deeplab, "train_one_epoch", lambda *a, **k: pytest.fail("training began"))
    root = write_folder(tmp_path / "data", "train", [np.array([[0, 1], [2, 1]] * 4, np.uint8)] * 2)
    write_folder(root, "val", [np.full((8, 2), 255, np.uint8)] * 2)
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(root, tmp_path / "r", "--num-classes", "3", "--batch-size", "2"))
    assert "every pixel of the 2 masks of split val" in str(e.value.code) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--scale", "0", "0"], "--scale: expected a number over 0, got '0'"),
    (["--scale", "2.0", "0.5"], "--scale: MIN 2 is above MAX 0.5"),
    (["--lr", "-0.01"], "--lr: expected a number 0 or more"),
    (["--lr", "nan"], "--lr: expected a number 0 or more"),
    (["--epochs", "0"], "--epochs: expected a whole number over 0"),
    (["--workers", "-1"], "--workers: expected a whole number 0 or more"),
    (["--batch-size", "0"], "--batch-size: expected a whole number over 0"),
    (["--crop", "1", "2", "3"], "--crop: takes H W or one size"),
    (["--size", "0", "4"], "--size: expected a whole number over 0"),
    (["--val-fraction", "1"], "--val-fraction: expected a number over 0 and below 1"),
    (["--momentum", "1.5"], "--momentum: expected a number 0 or more and at most 1"),
    (["--max-pixels", "-5"], "--max-pixels: expected a whole number over 0"),
    (["--device", "bogus"], "--device: 'bogus' is no device torch knows"),
    (["--device", "cuda:64"], "--device: 'cuda:64': "),
])
def test_flags_that_mean_nothing_are_refused_when_parsed(flags, needle, capsys):
    for parser in (train_deeplab.get_args_parser(), train_deeplab_finetune.get_args_parser()):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(flags)
        error = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in error and "\n" not in error


@pytest.mark.parametrize("flag, value, needle", [
    ("device", "cuda:64", "the run's --device 'cuda:64' is refused here ('cuda:64': "),
    ("epochs", 0, "the run's --epochs 0 is refused here (expected a whole number over 0"),
    ("arch", "unet", "the run's --arch 'unet' is refused here (not one of deeplabv3_mobilenet_v3_large"),
    ("scale", [2.0, "x"], "the run's --scale 'x' is refused here"),
])
def test_resuming_a_checkpoint_whose_flags_this_machine_or_the_parser_refuses_is_one_line(two_epoch_run, tmp_path,
                                                                                          flag, value, needle):
    state = torch.load(two_epoch_run[0] / "last.pth", weights_only=True)
    state["args"][flag] = value
    torch.save(state, tmp_path / "last.pth")
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_deeplab.get_args_parser().parse_args(["--resume", str(tmp_path / "last.pth")]))
    message = str(e.value.code)
    assert message.startswith(f"error: --resume {tmp_path / 'last.pth'}: ") and needle in message, message
    assert "\n" not in message


@pytest.mark.parametrize("speeds, chosen", [((1.0, 2.0), torch.channels_last), ((2.0, 1.0), torch.contiguous_format)])
def test_a_cpu_run_trains_in_the_winner_of_the_layout_race_at_its_batch_shape(tiny_demo, tmp_path, monkeypatch,
                                                                             capsys, speeds, chosen):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raced, used = [], []

    def race(model, shape, train, steps=3):
        raced.append((shape, train))
        return {"contiguous": speeds[0], "channels_last": speeds[1]}

    monkeypatch.setattr(models, "race_layouts", race)
    real = train_deeplab.train_one_epoch
    monkeypatch.setattr(train_deeplab, "train_one_epoch",
                        lambda model, *rest: used.append(memory_format_of(model)) or real(model, *rest))
    train_deeplab.main(train_args(tiny_demo, tmp_path / "r", "--crop", "48", "64"))
    assert raced == [((4, 48, 64), True)] and used == [chosen]
    name = "channels_last" if chosen == torch.channels_last else "contiguous"
    assert f"memory format {name}: --channels-last auto: channels_last {speeds[1]:.2f} against contiguous " \
           f"{speeds[0]:.2f} images/s on this CPU (raced now)" in capsys.readouterr().out


def test_sizes_and_scales_past_the_pixel_limit_and_running_out_of_memory_are_one_line(tiny_demo, tmp_path,
                                                                                     monkeypatch):
    for flags, needle in ((["--size", "20000", "20000"], "--size 20000 20000 has 400,000,000 pixels, over the limit"),
                          (["--crop", "30000"], "--crop 30000 30000 has 900,000,000 pixels"),
                          (["--scale", "0.5", "400", "--workers", "1"], "resized (--size, --scale")):
        with pytest.raises(SystemExit) as e:
            train_deeplab.main(train_args(tiny_demo, tmp_path / "r", *flags))
        assert needle in str(e.value.code) and "\n" not in str(e.value.code), flags

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 28800000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train_deeplab, "train_one_epoch", exhausted)
    with pytest.raises(SystemExit) as e:
        train_deeplab.main(train_args(tiny_demo, tmp_path / "s"))
    assert str(e.value.code) == "error: out of memory on the CPU; try a smaller --batch-size, --size or --crop"


# ---- --ema: the weights' moving average --------------------------------------------------------------------------


def test_ema_follows_the_weights_with_its_time_constant_in_epochs():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
    averaged = train_deeplab.weight_average(model, epochs=0.5, iters_per_epoch=4)  # decay 1 - 1/2
    with torch.no_grad():
        for t in model.parameters():
            t.zero_()
        averaged.update_parameters(model)  # the first update copies
        for t in model.parameters():
            t.fill_(1.0)
        for n in range(1, 4):
            averaged.update_parameters(model)
            expected = 1 - 0.5 ** n  # a run of ones after a zero, each weighed by (1 - decay) decay^age
            for t in averaged.module.parameters():
                assert torch.allclose(t, torch.full_like(t, expected))


def test_ema_run_trains_as_without_it_validates_and_saves_the_average_and_resumes_to_the_uninterrupted_run(
        two_epoch_run, tiny_demo, tmp_path, monkeypatch):
    flags = ("--epochs", "2", "--ema", "1")
    whole = tmp_path / "whole"
    train_deeplab.train(train_args(tiny_demo, whole, *flags))
    last = torch.load(whole / "last.pth", weights_only=True)
    assert last["ema_updates"] == 2 * 2  # 8 images in batches of 4, two epochs
    plain = torch.load(two_epoch_run[0] / "last.pth", weights_only=True)["model"]  # the same flags without --ema
    assert all(torch.equal(plain[k], last["training_model"][k]) for k in plain)
    assert any(not torch.equal(last["model"][k], last["training_model"][k]) for k in last["model"])
    model = models.load_model(whole / "last.pth")
    data = dataset.build_dataset(tiny_demo, "auto", "val", dataset.TransformConfig(train=False), model.class_map)
    scored, _ = evaluate.evaluate_dataset(model, data, bootstrap=10)
    assert scored["miou"] == pytest.approx(float(read_log(whole / "log.csv")[-1]["val_mIoU"]), abs=1e-4)

    def append(log, row, num_classes, real=train_deeplab.append_log):  # killed after epoch 1's checkpoints
        if row[0] == "1":
            raise Killed
        real(log, row, num_classes)

    monkeypatch.setattr(train_deeplab, "append_log", append)
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train_deeplab.train(train_args(tiny_demo, cut, *flags))
    monkeypatch.undo()
    train_deeplab.main(train_deeplab.get_args_parser().parse_args(["--resume", str(cut / "last.pth")]))
    assert metrics_of(cut / "log.csv") == metrics_of(whole / "log.csv")
    resumed = torch.load(cut / "last.pth", weights_only=True)
    for key in ("model", "training_model"):
        assert all(torch.equal(last[key][k], resumed[key][k]) for k in last[key])
