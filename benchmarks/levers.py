"""One lever of the full-resolution CamVid recipe, against the recipe itself at the same seeds (README "Results on
real data", BENCHMARKS.md "CamVid at full resolution").

    python benchmarks/levers.py --tta flip                         # scoring with flips: no training
    python benchmarks/levers.py -- --epochs 17 --low-res-epochs 0   # no progressive resizing, about the same time
    python benchmarks/levers.py --hold-out 0006R0 -- --augment      # scored on a driving sequence never trained on

For each seed, the recipe's run (RECIPE_FLAGS at --size and --crop: the folder that `benchmarks/plain_loop.py
--size 360 480 --crop 240 320 --recipe-flags ...` leaves under --work, trained here with the same flags when it is
missing), then either the same model scored with test-time augmentation (--tta) or the same command with the
lever's flags after it (a later flag wins), trained into a folder of its own. The final models (last epoch) are
compared on CamVid's val, paired bootstrap over the images; over two seeds or more, the mean difference and its t
interval.

CamVid's val frames all come from 0016E5, a driving sequence that also gives 204 of the 367 training frames, while
its test split is from sequences and light the training frames hardly show. `--hold-out SEQ` re-splits the 468
train and val frames by sequence (the file names' prefix): every frame of SEQ is scored, the other frames train, so
both arms are judged on a sequence they never saw (`--hold-out 0006R0`: 367 training frames, as many as CamVid's
train split, and 101 scored).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from common import CAMVID, ROOT, compared, machine, recipe, t_interval

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


def main(args: argparse.Namespace) -> None:
    size, crop = tuple(args.size), tuple(args.crop)
    data = held_out_split(args.camvid, args.hold_out, args.work) if args.hold_out else args.camvid
    runs = f"{size[0]}x{size[1]}" + (f"-held-out-{args.hold_out}" if args.hold_out else "")
    args.lever_flags = [flag for flag in args.lever_flags if flag != "--"]
    lever = f"--tta {args.tta}" if args.tta else " ".join(args.lever_flags)
    if not lever:
        raise SystemExit("error: give --tta or the lever's flags after --")
    rows = []
    for seed in args.seeds:
        base = args.work / f"{runs}-seed{seed}" / "recipe"
        if not (base / "last.pth").exists():
            recipe(data, base, seed, size, crop, RECIPE_FLAGS)
        if args.tta:
            rows.append((seed, with_tta(base / "last.pth", data, args.tta)))
            continue
        out = args.work / f"{runs}-seed{seed}" / ("lever" + "".join(args.lever_flags).replace("-", "_"))
        wall = recipe(data, out, seed, size, crop, [*RECIPE_FLAGS, *args.lever_flags])
        result = compared(base / "last.pth", out / "last.pth", out / "compared.json")
        rows.append((seed, {**result, "wall": wall}))
    scored = f"sequence {args.hold_out} held out of training" if args.hold_out else "val"
    print(f"\nCamVid {scored} at {size[0]}x{size[1]}: the recipe ({' '.join(RECIPE_FLAGS)}, crops of "
          f"{crop[0]}x{crop[1]}) against {lever}; {machine()}")
    print("| seed | the recipe | with the lever | lever - recipe, 95% CI |\n|---|---|---|---|")
    for seed, r in rows:
        cost = (f" ({r['seconds'][1]:.0f} s against {r['seconds'][0]:.0f} s to score)" if "seconds" in r
                else f" ({r['wall']:.0f} s)")
        print(f"| {seed} | {r['a']:.4f} | {r['b']:.4f}{cost} | {r['diff']:+.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    if len(rows) > 1:
        mean, half = t_interval([r["diff"] for _, r in rows])
        print(f"mean difference {mean:+.3f}, over the seeds 95% t interval [{mean - half:+.3f}, {mean + half:+.3f}]")
    (args.work / f"levers-{runs}.json").write_text(json.dumps({"lever": lever, "rows": rows}, indent=1) + "\n")


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
    parser.add_argument("lever_flags", nargs=argparse.REMAINDER, help="-- then flags for train_deeplab.py")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
