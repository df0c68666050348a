"""What the benchmark scripts share: the repository on the import path, timing things in turns, the t interval
over seeds, and README's CamVid command with the paired comparison of two of its models.

Each script in benchmarks/ runs from the repository root (`python benchmarks/NAME.py`) and prints the table it backs
in BENCHMARKS.md; nothing in the library imports them.
"""

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"  # the data the figures were measured on, beside the clone
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def in_turns(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
             sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """The median seconds of one call of each candidate, the candidates taking turns (a call of each per round,
    after `warmup` untimed rounds), so that a machine slowing down mid-run slows them all alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + rounds):
        for name, call in candidates.items():
            start = time.perf_counter()
            call()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def machine() -> str:
    """The CPU (or GPU), its threads and the torch version, and the date: the line under every table."""
    import torch

    from models import cpu_name

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    threads = torch.get_num_threads()
    return f"{device}, {threads} thread{'s' * (threads != 1)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student's t, 1 to 10 df


def t_interval(values: list[float]) -> tuple[float, float]:
    """The mean of values (two or more) and the half-width of its 95% t interval; past 10 degrees of freedom the t
    of 10, a little wide rather than too narrow."""
    t = T975[min(len(values) - 2, len(T975) - 1)]
    return statistics.mean(values), t * statistics.stdev(values) / len(values) ** 0.5


# ---- README's CamVid command, and two final models compared on the same images ---------------------------------


def recipe(root: Path, out: Path, seed: int, size: tuple[int, int], crop: tuple[int, int], flags: list[str]) -> float:
    """README's CamVid command at `size` and `crop`, from scratch, with `flags` after it (a later flag wins); the
    wall time."""
    command = [sys.executable, str(ROOT / "train_deeplab.py"), "--data", str(root), "--num-classes", "11",
               "--no-pretrained", "--size", *map(str, size), "--scale", "0.5", "2.0", "--crop", *map(str, crop),
               "--patience", "0", "--seed", str(seed), "--out", str(out), *flags]
    start = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.time() - start


def compared(a: Path, b: Path, json_path: Path) -> dict:
    """evaluate.py --checkpoint A --compare-checkpoint B on CamVid's val, each at its own training size: both mIoUs
    and per-class IoUs, and B - A with its 95% interval (paired bootstrap over the images)."""
    subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(a), "--compare-checkpoint",
                    str(b), "--bootstrap", "1000", "--json", str(json_path)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    result = json.loads(json_path.read_text())
    return {"a": result["miou"], "b": result["comparison"]["miou_b"], "diff": result["comparison"]["diff"],
            "ci": result["comparison"]["ci"], "iou_a": result["iou"], "iou_b": result["comparison"]["iou_b"]}
