"""The scripts behind BENCHMARKS.md still run and compute what they say: each on a tiny input (the figures
themselves are the scripts' to print)."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import CAMVID, random_masks, write_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import exports  # noqa: E402
import levers  # noqa: E402
import lossy_masks  # noqa: E402
import lovasz  # noqa: E402
import pipeline  # noqa: E402
import selection  # noqa: E402

from dataset import ClassOptions, TransformConfig  # noqa: E402


def test_the_lovasz_benchmark_times_every_loss_and_the_loop_agrees_with_the_library(capsys):
    lovasz.main(lovasz.get_args_parser().parse_args(["--size", "8", "8", "--runs", "1", "--num-classes", "4"]))
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in lines[3:] if line.startswith("| ")}
    assert set(rows) == {"ce", "ohem", "dice", "tversky", "focal", "lovasz", "lovasz per_image",
                         "lovasz, per-class loop"}
    assert float(rows["ce"][1]) == 1.0 and all(float(ms) > 0 for ms, _, _ in rows.values())
    assert float(rows["lovasz"][2]) == pytest.approx(float(rows["lovasz, per-class loop"][2]), abs=1e-5)


def test_the_pipeline_benchmark_runs_both_pipelines_on_the_same_files(tmp_path):
    root = write_folder(tmp_path / "data", "train", random_masks([0, 1, 2], 2, shape=(24, 32)))
    ours, reference = pipeline.pipeline_row(root, ClassOptions(num_classes=3), 2, augment=True, cache=False)
    assert ours > 0 and reference > 0
    cfg = TransformConfig(scale=(0.5, 2.0), crop=(16, 24), augment=True)
    files = root / "train" / "images" / "0.png", root / "train" / "masks" / "0.png"
    image, mask = pipeline.reference_pipeline(cfg)(*files)
    assert image.shape == (3, 16, 24) and image.dtype == torch.float32 and mask.shape == (1, 16, 24)


def test_the_selection_benchmark_holds_out_the_last_quarter_of_each_sequence_and_counts_neighbours():
    names = [f"A_{i:03d}.png" for i in range(20)] + [f"B_{i:03d}.png" for i in range(8)]
    test, start, pool = selection.split_frames(names, seed=0, start=4)
    assert test == names[15:20] + names[26:28]  # 5 of A's 20, 2 of B's 8
    assert not {*names[13:15], *names[24:26]} & {*start, *pool}  # the 2 frames before each block: nobody's
    assert sorted(start + pool) == names[:13] + names[20:24] and len(start) == 4 and not set(start) & set(pool)
    assert selection.neighbours(["A_000.png", "A_001.png", "A_003.png", "B_000.png"], names) == 1
    assert selection.neighbours(["A_001.png", "A_003.png"], [n for n in names if n != "A_002.png"]) == 1


def test_the_held_out_split_scores_every_frame_of_the_sequence_and_trains_on_all_the_others(tmp_path):
    camvid = tmp_path / "camvid"
    splits = {"train": ["0001TP_006690.png", "0006R0_f00930.png", "0016E5_00390.png"],
              "val": ["0006R0_f01050.png", "0016E5_07959.png"]}
    for split, names in splits.items():
        for kind in ("images", "masks"):
            (camvid / split / kind).mkdir(parents=True)
            for name in names:
                (camvid / split / kind / name).write_bytes(f"{kind} {name}".encode())
    for _ in range(2):  # a second call (a rerun of the benchmark) finds the links there and keeps them
        root = levers.held_out_split(camvid, "0006R0", tmp_path / "work")
    for split, names in (("val", ["0006R0_f00930.png", "0006R0_f01050.png"]),
                         ("train", ["0001TP_006690.png", "0016E5_00390.png", "0016E5_07959.png"])):
        for kind in ("images", "masks"):
            assert sorted(path.name for path in (root / split / kind).iterdir()) == names
            assert all((root / split / kind / name).read_bytes() == f"{kind} {name}".encode() for name in names)
    with pytest.raises(SystemExit, match="--hold-out Seq05VD: no CamVid frame"):
        levers.held_out_split(camvid, "Seq05VD", tmp_path / "work")


def test_kcenter_takes_the_frame_farthest_from_every_labelled_and_chosen_one_first():
    pool = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 1.5], [0.0, 5.0]])
    # from the labelled (0, 0): 0, 2, 10, 10.1, 5 -> (10, 1.5); then (10, 0) is 1.5 from it, (0, 5) still 5 ->
    # (0, 5); then (2, 0) at 2 beats (10, 0) at 1.5
    assert selection.kcenter(pool, torch.tensor([[0.0, 0.0]]), 3) == [3, 4, 1]


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid is not in ../shared/data/camvid")
def test_the_exports_benchmark_reads_back_every_exact_format_equal_to_camvids_masks(tmp_path, capsys):
    exports.main(exports.get_args_parser().parse_args(
        ["--camvid", str(CAMVID), "--frames", "2", "--work", str(tmp_path), "--formats", "coco", "cvat-xml",
         "labelme-json", "label-studio"]))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == 4 and all("| equal, every class" in row for row in rows)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid is not in ../shared/data/camvid")
def test_the_lossy_masks_benchmark_loses_most_pixels_to_exact_matching_and_few_at_the_default(capsys):
    lossy_masks.main(lossy_masks.get_args_parser().parse_args(["--camvid", str(CAMVID), "--masks", "2"]))
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "%" in line}
    right = {tolerance: float(cells[0].strip(" %")) for tolerance, cells in rows.items()}
    assert right["0"] < 60 < 90 < right["24 (the default)"]


def test_the_t_interval_over_seeds_uses_students_t_and_never_a_narrower_one():
    # five values 1..5: mean 3, sd sqrt(2.5); Student's t for 4 degrees of freedom at 97.5% is 2.776 (any table)
    mean, half = common.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3 and half == pytest.approx(2.776 * 2.5**0.5 / 5**0.5)
    # 21 values: t(20) is 2.086; the table stops at 10 degrees of freedom (2.228), wider, never the normal 1.96
    values = [float(i % 2) for i in range(21)]
    sd = (sum((v - sum(values) / 21) ** 2 for v in values) / 20) ** 0.5
    assert common.t_interval(values)[1] == pytest.approx(2.228 * sd / 21**0.5)
