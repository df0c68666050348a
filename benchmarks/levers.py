"""One lever of the full-resolution CamVid recipe, against the recipe itself at the same seeds (README "Results on
real data", BENCHMARKS.md "CamVid at full resolution").

    python benchmarks/levers.py --tta flip                         # scoring with flips: no training
    python benchmarks/levers.py --hold-out 0006R0 --tta ms -- --epochs 36 --low-res-epochs 16  # that lever's models
    python benchmarks/levers.py -- --epochs 17 --low-res-epochs 0   # no progressive resizing, about the same time
    python benchmarks/levers.py --hold-out 0006R0 -- --augment      # scored on a driving sequence never trained on
    python benchmarks/levers.py --hold-out 0006R0 --plain-epochs 17  # benchmarks/plain_loop.py's loop in its place

For each seed, the recipe's run (RECIPE_FLAGS at --size and --crop: the folder that `benchmarks/plain_loop.py
--size 360 480 --crop 240 320 --recipe-flags ...` leaves under --work, trained here with the same flags when it is
missing), then either that model scored with test-time augmentation (--tta; given flags, the model of the
recipe with them), or the same command with the lever's flags after it (a later flag wins), trained into a folder
of its own, or the plain loop of benchmarks/plain_loop.py for --plain-epochs at the same size, crop and seed. The
final models (last epoch) are compared on CamVid's val, paired bootstrap over the images; over two seeds or more,
the mean difference and its t interval. Walls: a recipe arm's, the sum of its log.csv's Runtime; the plain loop's,
its own, as its checkpoint keeps it. The table also goes to a JSON file under --work named by the split, the mode
and the flags (levers-360x480-held-out-0006R0-plain28-lever__epochs36.json), one per command.

CamVid's val frames all come from 0016E5, a driving sequence that also gives 204 of the 367 training frames, while
its test split is from sequences and light the training frames hardly show. `--hold-out SEQ` re-splits the 468
train and val frames by sequence (the file names' prefix): every frame of SEQ is scored, the other frames train, so
both arms are judged on a sequence they never saw (`--hold-out 0006R0`: 367 training frames, as many as CamVid's
train split, and 101 scored).
"""

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from common import CAMVID, ROOT, compared, machine, recipe, t_interval
from plain_loop import plain_loop

from dataset import TransformConfig, build_dataset, collate
from evaluate import compare_verdict, device_of, evaluate
from models import load_model

RECIPE_FLAGS = ["--epochs", "22", "--low-res-epochs", "10"]  # README's full-resolution command


def with_tta(checkpoint: Path, camvid: Path, tta: str) -> dict:
    """The final model on CamVid's val at its training size, scored plainly (A) and with `tta` (B), paired."""
    torch.set_flush_denormal(True)  # as training's validation does: a model from scratch yields denormals on x86
    model = load_model(checkpoint)
    data = build_dataset(camvid, "auto", "val", TransformConfig(size=model.size, train=False), model.class_map)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate)
    results, seconds = [], []
    for mode in ("none", tta):
        start = time.time()
        results.append(evaluate(model, loader, None, device_of(model), model.class_map.num_classes, tta=mode))
        seconds.append(time.time() - start)
    plain, augmented = results
    verdict = compare_verdict(plain["confusions"], augmented["confusions"], resamples=1000, seed=0)
    return {"a": plain["miou"], "b": augmented["miou"], "diff": verdict["diff"], "ci": verdict["ci"],
            "iou_a": plain["iou"], "iou_b": augmented["iou"], "seconds": seconds}


def held_out_split(camvid: Path, sequence: str, work: Path) -> Path:
    """A `folder` layout under `work` that links CamVid's train and val frames: those whose name starts with
    `sequence` as val, all the others as train."""
    root = work / f"camvid-held-out-{sequence}"
    frames = sorted(path for split in ("train", "val") for path in (camvid / split / "images").glob("*.png"))
    if not any(path.name.startswith(sequence) for path in frames):
        raise SystemExit(f"error: --hold-out {sequence}: no CamVid frame under {camvid} has a name starting with it")
    for path in frames:
        split = "val" if path.name.startswith(sequence) else "train"
        for kind, source in (("images", path), ("masks", path.parent.parent / "masks" / path.name)):
            link = root / split / kind / path.name
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source.resolve())
    return root


def trained(data: Path, out: Path, seed: int, size: tuple[int, int], crop: tuple[int, int], flags: list[str]) -> float:
    """The recipe with `flags` after RECIPE_FLAGS, trained into `out` unless it is there already; its wall, the sum
    of log.csv's Runtime (every epoch with its validation), so that a run trained earlier reports it too."""
    if not (out / "last.pth").exists():
        recipe(data, out, seed, size, crop, [*RECIPE_FLAGS, *flags])
    with open(out / "log.csv") as f:
        return sum(float(row["Runtime"]) for row in csv.DictReader(f))


def run_folder(flags: list[str]) -> str:
    """The folder of the recipe's run with `flags` (`--epochs 36` -> lever__epochs36), or with none, the recipe's."""
    return "lever" + "".join(flags).replace("-", "_") if flags else "recipe"


def one_seed(args: argparse.Namespace, data: Path, runs: Path, seed: int) -> dict:
    """Arms A and B at one seed, compared: the recipe (with the flags after --, if any) and the same model with
    TTA; the plain loop and the recipe (with the flags, if any); or the recipe and the recipe with the flags."""
    size, crop, flags = tuple(args.size), tuple(args.crop), args.lever_flags
    base, lever = runs / run_folder([]), runs / run_folder(flags)
    if args.tta:
        trained(data, lever, seed, size, crop, flags)
        return with_tta(lever / "last.pth", data, args.tta)
    if args.plain_epochs:
        wall = trained(data, lever, seed, size, crop, flags)
        plain = runs / f"plain{args.plain_epochs}" / "last.pth"
        if not plain.exists():
            plain_loop(data, plain, args.plain_epochs, seed, size, crop)
        plain_wall = torch.load(plain, map_location="cpu", weights_only=True).get("seconds", 0.0)  # 0: saved before it
        return {**compared(plain, lever / "last.pth", lever / f"compared-plain{args.plain_epochs}.json"),
                "wall_a": plain_wall, "wall_b": wall}
    base_wall, wall = trained(data, base, seed, size, crop, []), trained(data, lever, seed, size, crop, flags)
    return {**compared(base / "last.pth", lever / "last.pth", lever / "compared.json"), "wall_a": base_wall,
            "wall_b": wall}


def main(args: argparse.Namespace) -> None:
    size, crop = tuple(args.size), tuple(args.crop)
    data = held_out_split(args.camvid, args.hold_out, args.work) if args.hold_out else args.camvid
    runs = f"{size[0]}x{size[1]}" + (f"-held-out-{args.hold_out}" if args.hold_out else "")
    args.lever_flags = [flag for flag in args.lever_flags if flag != "--"]
    if not (args.tta or args.plain_epochs or args.lever_flags):
        raise SystemExit("error: give --tta, --plain-epochs or the lever's flags after --")
    base = f"the recipe ({' '.join(RECIPE_FLAGS)}, crops of {crop[0]}x{crop[1]})"
    lever = base + (f" with {' '.join(args.lever_flags)}" if args.lever_flags else "")
    if args.plain_epochs:
        arms = (f"the plain loop, {args.plain_epochs} epochs", lever)
    elif args.tta:
        arms = (lever, f"the same models scored with --tta {args.tta}")
    else:
        arms = (base, " ".join(args.lever_flags))
    rows = [(seed, one_seed(args, data, args.work / f"{runs}-seed{seed}", seed)) for seed in args.seeds]
    scored = f"sequence {args.hold_out} held out of training" if args.hold_out else "val"
    print(f"\nCamVid {scored} at {size[0]}x{size[1]}: A = {arms[0]}, B = {arms[1]}; {machine()}")
    print("| seed | A | B | B - A, 95% CI |\n|---|---|---|---|")
    for seed, r in rows:
        a, b = (f"{r[arm]:.4f}" + (f", {r[f'wall_{arm}']:.0f} s" if r.get(f"wall_{arm}") else "") for arm in "ab")
        if "seconds" in r:
            b += f" ({r['seconds'][1]:.0f} s against {r['seconds'][0]:.0f} s to score)"
        print(f"| {seed} | {a} | {b} | {r['diff']:+.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    if len(rows) > 1:
        mean, half = t_interval([r["diff"] for _, r in rows])
        print(f"mean difference {mean:+.3f}, over the seeds 95% t interval [{mean - half:+.3f}, {mean + half:+.3f}]")
    mode = f"tta-{args.tta}" if args.tta else f"plain{args.plain_epochs}" if args.plain_epochs else ""
    name = "-".join(part for part in ("levers", runs, mode, run_folder(args.lever_flags)) if part)
    (args.work / f"{name}.json").write_text(json.dumps({"arms": arms, "rows": rows}, indent=1) + "\n")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", type=Path, default=CAMVID)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "plain-loop-benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--size", type=int, nargs=2, default=[360, 480], metavar=("H", "W"))
    parser.add_argument("--crop", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--hold-out", default=None, metavar="SEQ",
                        help="train on CamVid's frames of the other sequences, score on this one's (e.g. 0006R0)")
    parser.add_argument("--tta", default=None, choices=("flip", "ms"), help="score the recipe's models with this TTA")
    parser.add_argument("--plain-epochs", type=int, default=0, metavar="N",
                        help="benchmarks/plain_loop.py's loop for N epochs against the recipe")
    parser.add_argument("lever_flags", nargs=argparse.REMAINDER, help="-- then flags for train_deeplab.py")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
