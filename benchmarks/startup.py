"""A run's start-up on CamVid: from process start to its first training batch, and the share of it the check of
every mask of both splits takes (BENCHMARKS.md, "Exports of annotation tools, lossy masks").

    python benchmarks/startup.py [--camvid ../shared/data/camvid] [--runs 3]
"""

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

from common import CAMVID, ROOT, machine

ONE_RUN = """
import contextlib, io, sys, time
start = time.perf_counter()
import train_deeplab
args = train_deeplab.get_args_parser().parse_args(sys.argv[1:])
spent, real = {}, train_deeplab.split_statistics

def timed(*a, **k):
    t = time.perf_counter()
    result = real(*a, **k)
    spent[len(spent)] = time.perf_counter() - t
    return result

train_deeplab.split_statistics = timed
with contextlib.redirect_stdout(io.StringIO()):
    run = train_deeplab.build_run(args, None, None)
    next(iter(run.train_loader))
print(f"{time.perf_counter() - start:.3f} {sum(spent.values()):.3f}")
"""


def main(args: argparse.Namespace) -> None:
    print(f"python train_deeplab.py --data CAMVID --num-classes 11 --no-pretrained --size 180 240, a fresh process "
          f"each; {machine()}")
    print("| run | start-up to the first batch | the masks' check (train and val) | share |\n|---|---|---|---|")
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()):
            flags = ["--data", str(args.camvid), "--num-classes", "11", "--no-pretrained", "--size", "180", "240",
                     "--out", str(Path(out) / "run")]
            line = subprocess.run([sys.executable, "-c", ONE_RUN, *flags], cwd=ROOT, check=True, capture_output=True,
                                  text=True).stdout.split()
        total, check = float(line[0]), float(line[1])
        print(f"| {run} | {total:.2f} s | {check:.3f} s | {check / total:.1%} |")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", type=Path, default=CAMVID)
    parser.add_argument("--runs", type=int, default=3)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
