"""What the benchmark scripts share: the repository on the import path, timing things in turns, and the t
interval over seeds.

Each script in benchmarks/ runs from the repository root (`python benchmarks/NAME.py`) and prints the table it backs
in BENCHMARKS.md; nothing in the library imports them.
"""

import statistics
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
