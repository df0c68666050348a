"""Which frames to label next: what `evaluate.py --predict POOL --select N` picks, trained on, against random picks
and every other way of picking tried, over seeds (BENCHMARKS.md, "Which frames to label next").

    python benchmarks/selection.py                                       # the table: 5 seeds, about 4 hours on 2 cores
    python benchmarks/selection.py --seeds 0 --budgets 46 --arms random select       # a part of it

From CamVid's train frames (three driving sequences, about a frame a second) at ../shared/data/camvid, per seed:
  test   the last quarter of each sequence, and the 2 frames before it left out: every model is scored on these,
         which no arm picks from and no checkpoint calibrates on (the same for every seed)
  start  46 frames of the rest, drawn at random: labelled; round 1 trains on them (README's "Label the next images")
  pool   the other frames: each arm picks 46 and 92 of them (the 46 are the first half of the 92)
Round 1 validates on CamVid's val (its best.pth and the reliability counts behind the score come from there). Each
arm's picks join the 46 and train the same way: every frame 6 times an epoch for 4 epochs, at 120x160 from scratch
(the recipe's defaults), scored on the test frames after the last epoch. Arms: random; score (the error estimated
by the validation split's counts, highest first: `--select` before this benchmark); kcenter (greedy k-center over
the model's pooled features, the start frames as centres); coverage (greedy facility location over the same features,
the start frames covered); weighted (the same coverage, each pool frame weighted by its estimated error); thumbnails
(the same coverage of 24x32 thumbnails, no model); select (`evaluate.py --predict --select`, run as a user runs it:
the coverage order with every frame next to a labelled or earlier pick of its sequence moved last).

Every run is kept under --work; run again, the finished ones are read back (where an arm's picks are still the
same), so a killed benchmark goes on.
"""

import argparse
import csv
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import CAMVID, ROOT, t_interval

from evaluate import InferenceOptions, apart, coverage_order, embedded, labelling_score, predicted_images, thumbnails
from models import load_checkpoint, model_with_classes

ARMS = ("random", "score", "kcenter", "coverage", "weighted", "thumbnails", "select")
TEST_SHARE = 0.25  # the last quarter of each sequence is the test frames
GAP = 2  # frames before each test block that nobody labels or picks
TRAIN = ["--num-classes", "11", "--no-pretrained", "--size", "120", "160", "--scale", "0.5", "2.0", "--crop", "120",
         "160", "--patience", "0", "--workers", "2"]
REPEATS, EPOCHS = 6, 4  # each labelled frame 6 times an epoch, 4 epochs: 24 passes, the test frames scored 4 times


# ---- the split: test frames, a labelled start, the pool -------------------------------------------------------------


def sequences(names: list[str]) -> dict[str, list[str]]:
    """CamVid's frames by sequence (the name before the first _), in time order."""
    found: dict[str, list[str]] = {}
    for name in sorted(names):
        found.setdefault(name.split("_")[0], []).append(name)
    return found


def split_frames(names: list[str], seed: int, start: int) -> tuple[list[str], list[str], list[str]]:
    """(test, start, pool): the last quarter of each sequence is test, GAP frames before it nobody's, and `start`
    frames of the rest drawn at random by the seed."""
    test, rest = [], []
    for frames in sequences(names).values():
        cut = len(frames) - round(TEST_SHARE * len(frames))
        test += frames[cut:]
        rest += frames[: cut - GAP]
    labelled = sorted(random.Random(seed).sample(rest, start))
    return test, labelled, sorted(set(rest) - set(labelled))


def neighbours(picked: list[str], pool: list[str]) -> int:
    """Pairs of picked frames next to each other in their sequence, nothing of the pool between them."""
    chosen = set(picked)
    return sum(a in chosen and b in chosen for frames in sequences(pool).values() for a, b in zip(frames, frames[1:]))


# ---- data folders and training ---------------------------------------------------------------------------------------


def link_split(camvid: Path, folder: Path, names: list[str], repeats: int = 1, split: str = "train") -> None:
    """folder/images and folder/masks: links to CamVid's frames of `split`, each `repeats` times under other names."""
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            for r in range(repeats):
                link = folder / kind / (f"{r}_{name}" if repeats > 1 else name)
                if not link.exists():
                    link.symlink_to((camvid / split / kind / name).resolve())


def train(data: Path, out: Path, seed: int, epochs: int) -> dict:
    """train_deeplab.py on `data` with the benchmark's flags; the last epoch's row of its log.csv."""
    if not (out / "log.csv").exists() or len((out / "log.csv").read_text().splitlines()) <= epochs:
        shutil.rmtree(out, ignore_errors=True)  # a run killed half-way starts again
        command = [sys.executable, str(ROOT / "train_deeplab.py"), "--data", str(data), *TRAIN, "--epochs",
                   str(epochs), "--seed", str(seed), "--out", str(out)]
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.txt", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return {"miou": float(rows[-1]["val_mIoU"]), "seconds": sum(float(r["Runtime"]) for r in rows),
            "iou": [float(rows[-1][f"class_{c}_val"]) for c in range(11)], "best": max(float(r["val_mIoU"])
                                                                                    for r in rows)}


def round_one(camvid: Path, work: Path, seed: int, start: list[str]) -> Path:
    """The model of round 1: the start frames, validated on CamVid's val; its best.pth."""
    data = work / "data"
    link_split(camvid, data / "train", start)
    link_split(camvid, data / "val", sorted(p.name for p in (camvid / "val" / "images").iterdir()), split="val")
    train(data, work / "round1", seed, REPEATS * EPOCHS)
    return work / "round1" / "best.pth"


# ---- the arms: each orders the pool, its first 46 or 92 are its picks --------------------------------------------


def kcenter(pool: torch.Tensor, labelled: torch.Tensor, n: int) -> list[int]:
    """Greedy k-center (Sener and Savarese 2018): each next frame the one farthest from every labelled and chosen
    frame."""
    far, order = torch.cdist(pool, labelled).min(1).values, []
    for _ in range(n):
        i = int(far.argmax())
        order.append(i)
        far = torch.minimum(far, torch.cdist(pool, pool[i : i + 1])[:, 0])
    return order


def cli_picks(work: Path, name: str, pool_dir: Path, n: int, flags: list[str]) -> list[str]:
    """The first n rows of ranking.csv of `evaluate.py --predict POOL --select n FLAGS`, run as a user runs it."""
    out = work / name
    if not (out / "ranking.csv").exists():
        command = [sys.executable, str(ROOT / "evaluate.py"), *flags, "--predict", str(pool_dir), "--select", str(n),
                   "--out", str(out)]
        with open(work / f"{name}.txt", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    with open(out / "ranking.csv") as f:
        return [Path(row["image"]).name for row in csv.DictReader(f)][:n]


def orders(camvid: Path, work: Path, checkpoint: Path, start: list[str], pool: list[str], n: int, seed: int
           ) -> dict[str, list[str]]:
    """Every arm's first n frames of the pool, in its order."""
    pool_dir = work / "pool"
    link_split(camvid, pool_dir, pool)
    files = [pool_dir / "images" / name for name in pool]
    state = load_checkpoint(checkpoint)
    model = model_with_classes(state, checkpoint, "cpu", "off")
    scorer, size = labelling_score(state, 11), model.size
    frames = lambda paths, embed: predicted_images(model, paths, size, InferenceOptions(), 8, 2, embed)  # noqa: E731
    seen = {i: (scorer(probs)[0], e) for i, _, probs, e in frames(files, True)}
    scores = torch.tensor([seen[i][0] for i in range(len(files))])
    features = torch.stack([seen[i][1] for i in range(len(files))])
    labelled = [camvid / "train" / "images" / name for name in start]
    known = embedded(frames, labelled)
    coverage = coverage_order(features, known)
    by_index = {
        "random": random.Random(f"{seed} random").sample(range(len(pool)), n),
        "score": scores.argsort(descending=True).tolist()[:n],
        "kcenter": kcenter(features, known, n),
        "coverage": [pick.index for pick in coverage[:n]],
        "weighted": [pick.index for pick in coverage_order(features, known, weights=scores)[:n]],
        "thumbnails": [pick.index for pick in coverage_order(thumbnails(files, 2), thumbnails(labelled, 2))[:n]],
    }
    picks = {arm: [pool[i] for i in order] for arm, order in by_index.items()}
    same = ["--batch-size", "8", "--workers", "2", "--channels-last", "off"]  # as above, so the numbers are the same
    picks["select"] = cli_picks(work, "select", pool_dir / "images", n, ["--checkpoint", str(checkpoint), *same])
    own = [pool[p.index] for p in apart(coverage, files, labelled)[:n]]
    alike = len(set(own) & set(picks["select"]))
    print(f"seed {seed}: evaluate.py --select and apart(coverage_order) here pick {alike} of {n} alike")
    return picks


# ---- the table: each arm against random at the same seed -----------------------------------------------------------

def interval(values: list[float]) -> str:
    """The mean and its 95% t interval over the seeds."""
    if len(values) < 2:
        return f"{values[0]:+.4f}"
    mean, half = t_interval(values)
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"


def print_table(results: dict, arms: list[str], budgets: list[int], seeds: list[int]) -> None:
    for budget in budgets:
        done = [s for s in seeds if f"{s} random {budget}" in results]
        base = [results[f"{s} random {budget}"]["miou"] for s in done]
        spread = f", sd {statistics.stdev(base):.4f}" if len(base) > 1 else ""
        print(f"\n46 labelled + {budget} picked, test mIoU at the last epoch; random: mean "
              f"{statistics.mean(base):.4f}{spread} over {len(base)} seeds" if base else "")
        print("| arm | " + " | ".join(f"seed {s}" for s in done) + " | mean mIoU | minus random, mean [95% t interval] "
              "| neighbouring pairs |")
        print("|---|" + "---|" * (len(done) + 3))
        for arm in arms:
            rows = [results.get(f"{s} {arm} {budget}") for s in done]
            if None in rows or not rows:
                continue
            gains = [r["miou"] - b for r, b in zip(rows, base)]
            cells = [f"{r['miou']:.4f}" + ("" if arm == "random" else f" ({g:+.4f})") for r, g in zip(rows, gains)]
            print(f"| {arm} | " + " | ".join(cells) + f" | {statistics.mean(r['miou'] for r in rows):.4f} | "
                  f"{'' if arm == 'random' else interval(gains)} | "
                  f"{statistics.mean(r['neighbours'] for r in rows):.1f} |")


# ---- main -----------------------------------------------------------------------------------------------------------


def run_seed(args: argparse.Namespace, seed: int, results: dict, save: Callable[[], None]) -> None:
    names = sorted(p.name for p in (args.camvid / "train" / "images").iterdir())
    test, start, pool = split_frames(names, seed, args.start)
    work = args.work / f"seed{seed}"
    checkpoint = round_one(args.camvid, work, seed, start)
    picks = orders(args.camvid, work, checkpoint, start, pool, max(args.budgets), seed)
    link_split(args.camvid, args.work / "test", test)
    for budget in args.budgets:
        for arm in args.arms:
            key = f"{seed} {arm} {budget}"
            chosen = picks[arm][:budget]
            if key in results and results[key]["picked"] == chosen:
                continue
            data, run = work / f"{arm}-{budget}", work / f"run-{arm}-{budget}"
            for old in (data, run):  # a run killed half-way, or one of other picks, starts again
                shutil.rmtree(old, ignore_errors=True)
            link_split(args.camvid, data / "train", start + chosen, REPEATS)
            if not (data / "val").exists():
                (data / "val").symlink_to((args.work / "test").resolve())
            t0 = time.time()
            result = train(data, run, seed, EPOCHS)
            results[key] = {**result, "neighbours": neighbours(chosen, pool), "picked": chosen,
                            "wall": round(time.time() - t0, 1)}
            save()
            print(f"seed {seed} {arm} {budget}: test mIoU {result['miou']:.4f}, {results[key]['neighbours']} "
                  f"neighbouring pairs", flush=True)


def main(args: argparse.Namespace) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}

    def save() -> None:
        store.write_text(json.dumps(results, indent=1) + "\n")

    for seed in [] if args.table else args.seeds:
        run_seed(args, seed, results, save)
    print(f"\nCamVid: {args.start} labelled frames, the pool the rest less the test frames; {REPEATS * EPOCHS} passes "
          f"at 120x160 from scratch, torch {torch.__version__}")
    print_table(results, args.arms, args.budgets, args.seeds)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", type=Path, default=CAMVID)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "select-benchmark",
                        help="where the runs go (kept, so a second call reads them back)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", type=int, nargs="+", default=[46, 92])
    parser.add_argument("--start", type=int, default=46, help="labelled frames before picking")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--table", action="store_true", help="print the table of the runs kept, train nothing")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
