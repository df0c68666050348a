"""The demo as README's first lines run it: `python train_deeplab.py`, then the card's fine-tuning command, each
timed from the outside, with the best val mIoU each reached (README's first paragraph, BENCHMARKS.md "The demo").

    python benchmarks/demo.py [--seeds 0] [--also --loss ce]
"""

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine


def timed_run(command: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, best val mIoU of out/log.csv) of one command."""
    start = time.time()
    subprocess.run([sys.executable, *command, "--out", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(out / "log.csv") as f:
        return time.time() - start, max(float(row["val_mIoU"]) for row in csv.DictReader(f))


def main(args: argparse.Namespace) -> None:
    rows = []
    for seed in args.seeds:
        work = args.work / f"seed{seed}-{time.strftime('%H%M%S')}"
        demo = ["train_deeplab.py", "--seed", str(seed)]
        rows.append((f"python train_deeplab.py --seed {seed}", *timed_run(demo, work / "demo")))
        fine = ["train_deeplab_finetune.py", "--unfreeze", "--lr-backbone", "1e-5", "--checkpoint",
                str(work / "demo" / "best.pth")]
        rows.append(("python train_deeplab_finetune.py --unfreeze --lr-backbone 1e-5", *timed_run(fine, work / "fine")))
        if args.also:
            rows.append((f"python train_deeplab.py --seed {seed} {' '.join(args.also)}",
                         *timed_run([*demo, *args.also], work / "also")))
    print(f"\n{machine()}")
    print("| command | wall | best val mIoU |\n|---|---|---|")
    for command, seconds, miou in rows:
        print(f"| `{command}` | {seconds:.1f} s | {miou:.4f} |")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo-benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--also", nargs=argparse.REMAINDER, default=[], help="a third run: the demo with these flags")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
