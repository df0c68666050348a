"""DeepLabV3+ against DeepLabV3 on MobileNetV3, from scratch, at the same budget: on the demo data and on CamVid
(README "Cost table", BENCHMARKS.md "DeepLabV3+ against DeepLabV3").

    python benchmarks/archs.py [--data demo camvid] [--seed 0]

Each pair trains with the same seed, data order and flags, one run at a time; the best.pth of each is compared by
`evaluate.py --compare-checkpoint` (the paired bootstrap over the validation images).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import CAMVID, ROOT, machine

ARCHS = ("deeplabv3_mobilenet_v3_large", "deeplabv3plus_mobilenet_v3_large")
DATA = {  # the demo at its defaults; CamVid at the 180x240 recipe, 12 epochs, no early stop
    "demo": [],
    "camvid": ["--data", str(CAMVID), "--num-classes", "11", "--no-pretrained", "--size", "180", "240", "--scale",
               "0.5", "2.0", "--crop", "180", "240", "--epochs", "12", "--patience", "0"],
}


def main(args: argparse.Namespace) -> None:
    rows = []
    for data in args.data:
        seconds = {}
        for arch in ARCHS:
            out = args.work / f"{data}-{arch}-seed{args.seed}"
            shutil.rmtree(out, ignore_errors=True)  # this script's own run of before
            start = time.time()
            subprocess.run([sys.executable, str(ROOT / "train_deeplab.py"), *DATA[data], "--arch", arch, "--seed",
                            str(args.seed), "--out", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            seconds[arch] = time.time() - start
        first, second = (args.work / f"{data}-{arch}-seed{args.seed}" / "best.pth" for arch in ARCHS)
        report = args.work / f"{data}-compared.json"
        subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(first), "--compare-checkpoint",
                        str(second), "--json", str(report)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(report.read_text())
        rows.append((data, result, seconds))
    print(f"\nseed {args.seed}; {machine()}")
    print("| data | DeepLabV3 | DeepLabV3+ | V3+ - V3, 95% CI | wall V3 / V3+ |\n|---|---|---|---|---|")
    for data, r, s in rows:
        c = r["comparison"]
        print(f"| {data} | {r['miou']:.4f} | {c['miou_b']:.4f} | {c['diff']:+.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] "
              f"| {s[ARCHS[0]]:.0f} s / {s[ARCHS[1]]:.0f} s |")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "archs-benchmark")
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
