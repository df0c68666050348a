from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, write_pair
from PIL import Image

import dataset
from dataset import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFROAD_CLASSES,
    ClassOptions,
    TransformConfig,
    build_dataset,
    class_weights,
    collate,
    make_demo,
    normalize,
    read_mask,
    split_statistics,
    transform_pair,
)

PLAIN = TransformConfig(train=False)


def offroad_root(tmp_path: Path, masks: list[np.ndarray], split: str = "train") -> Path:
    for i, mask in enumerate(masks):
        write_pair(
            tmp_path / split / "Color_Images" / f"{i}.png", tmp_path / split / "Segmentation" / f"{i}.png", mask, i
        )
    return tmp_path


def test_offroad_maps_raw_ids_to_ten_classes_and_ignores_the_rest(tmp_path):
    raw = np.array([[100, 200, 300, 500, 550], [600, 700, 800, 7100, 10000], [0, 4000, 100, 10000, 65535]])
    root = offroad_root(tmp_path, [raw])
    assert read_mask(root / "train" / "Segmentation" / "0.png").max() == 65535  # 16 bits kept, not high bytes
    ds = build_dataset(root, "auto", "train", PLAIN)
    assert ds.class_map.names[5] == "Flowers" and ds.class_map.num_classes == 10
    _, mask = ds[0]
    expected = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 0, 9, IGNORE_INDEX]]
    assert mask.tolist() == expected
    assert mask.dtype == torch.int64


def test_unknown_mask_values_are_reported_once_per_dataset(tmp_path, capsys):
    root = offroad_root(tmp_path, [np.array([[0, 100], [4000, 7100]]), np.array([[0, 0], [0, 7100]])])
    ds = build_dataset(root, "offroad", "train", PLAIN)
    ds[0], ds[1], ds[0]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "2 pixels" in err


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    ids = np.array(
        [[7, 8, 26, 0], [1, 33, 24, 6]], dtype=np.uint8
    )  # road, sidewalk, car, unlabeled / ego, bicycle, person, ground
    city = "aachen"
    write_pair(
        tmp_path / "leftImg8bit" / "train" / city / "aachen_000000_000019_leftImg8bit.png",
        tmp_path / "gtFine" / "train" / city / "aachen_000000_000019_gtFine_labelIds.png",
        ids,
    )
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(
        tmp_path / "gtFine" / "train" / city / "aachen_000000_000019_gtFine_color.png"
    )
    ds = build_dataset(tmp_path, "auto", "train", PLAIN)
    assert len(ds) == 1 and ds.pairs[0][1].name.endswith("_labelIds.png")
    assert ds.class_map.num_classes == 19 and ds.class_map.names[0] == "road" and ds.class_map.names[18] == "bicycle"
    _, mask = ds[0]
    assert mask.tolist() == [[0, 1, 13, IGNORE_INDEX], [IGNORE_INDEX, 18, 11, IGNORE_INDEX]]


def test_folder_keeps_indices_below_num_classes_and_ignores_others(tmp_path):
    write_pair(
        tmp_path / "val" / "images" / "a.jpg", tmp_path / "val" / "masks" / "a.png", np.array([[0, 10, 11, 255]])
    )
    names = tuple(f"c{i}" for i in range(11))
    ds = build_dataset(tmp_path, "auto", "val", PLAIN, ClassOptions(num_classes=11, names=names))
    assert ds[0][1].tolist() == [[0, 10, IGNORE_INDEX, IGNORE_INDEX]]
    assert ds.class_map.names[10] == "c10"


def test_stats_counts_are_exact_and_weights_follow_median_frequency(tmp_path, capsys):
    a = np.array([[100, 100, 10000, 0], [100, 7100, 7100, 7100]])
    b = np.array([[10000, 10000, 10000, 10000], [10000, 800, 4000, 7100]])
    root = offroad_root(tmp_path, [a, b])
    ds = build_dataset(root, "offroad", "train", PLAIN)
    stats = split_statistics(ds.pairs, ds.class_map)
    counts, ignored, unknown = stats.pixels, stats.ignored, stats.unknown
    expected = np.zeros(10, dtype=np.int64)
    expected[0], expected[7], expected[8], expected[9] = 3, 1, 4, 6
    assert counts.tolist() == expected.tolist() and ignored == 2 and unknown == 2

    freq = {0: 3 / 14, 7: 1 / 14, 8: 4 / 14, 9: 6 / 14}
    median = (3 / 14 + 4 / 14) / 2
    weights = class_weights(counts)
    for c, f in freq.items():
        assert weights[c] == pytest.approx(min(max(median / f, 0.1), 10.0))
    assert weights[1] == 0  # absent

    dataset.main(dataset.get_args_parser().parse_args(["--data", str(root), "--stats"]))
    out = capsys.readouterr().out
    assert "Trees" in out and " 3 " in out and "ignored pixels: 2" in out


def test_random_crop_pads_masks_with_ignore_index():
    image = torch.full((3, 4, 5), 200, dtype=torch.uint8)
    mask = torch.ones(4, 5, dtype=torch.uint8)
    cfg = TransformConfig(crop=(6, 8), hflip=False)
    out_image, out_mask = transform_pair(image, mask, cfg)
    assert out_mask.shape == (6, 8) and out_image.shape == (3, 6, 8)
    assert (
        (out_mask[:4, :5] == 1).all()
        and (out_mask[4:] == IGNORE_INDEX).all()
        and (out_mask[:, 5:] == IGNORE_INDEX).all()
    )


def test_flip_moves_image_and_mask_together():
    image = torch.zeros(3, 2, 6, dtype=torch.uint8)
    image[:, :, 0] = 255
    mask = torch.zeros(2, 6, dtype=torch.uint8)
    mask[:, 0] = 3
    torch.manual_seed(0)
    for _ in range(10):  # both outcomes of the coin occur; image and mask always agree
        out_image, out_mask = transform_pair(image, mask, TransformConfig())
        assert torch.equal(out_mask == 3, out_image[0] > 0)


def test_val_transform_resizes_only_and_normalize_applies_imagenet_statistics():
    image = torch.full((3, 4, 6), 255, dtype=torch.uint8)
    mask = torch.arange(24, dtype=torch.uint8).reshape(4, 6)
    out_image, out_mask = transform_pair(image, mask, TransformConfig(size=(2, 3), train=False, augment=True))
    assert out_image.shape == (3, 2, 3) and out_mask.shape == (2, 3) and out_image.dtype == torch.uint8
    assert (out_image == 255).all()  # no jitter outside training
    assert set(out_mask.flatten().tolist()) <= set(range(24))  # nearest: no blended labels
    normalised = normalize(out_image[None])
    for c in range(3):
        assert torch.allclose(normalised[0, c], torch.tensor((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_crop_at_a_large_scale_matches_resizing_first_then_cropping():
    # the crop is cut from the source and resized on its own; a label map of vertical stripes shows whether the
    # region and the scale are right: at scale 2 each 1-pixel source column becomes 2 output columns
    mask = torch.arange(40, dtype=torch.uint8).repeat(20, 1)  # [20, 40], value = source column
    image = mask[None].expand(3, 20, 40).clone()
    torch.manual_seed(0)
    _, out = transform_pair(image, mask, TransformConfig(scale=(2.0, 2.0), crop=(8, 16), hflip=False))
    assert out.shape == (8, 16)
    columns = out[0].tolist()
    assert columns == [columns[0] + i // 2 for i in range(16)]


def test_collate_pads_images_of_different_sizes():
    a = (torch.ones(3, 2, 3), torch.zeros(2, 3, dtype=torch.long))
    b = (torch.ones(3, 3, 2), torch.ones(3, 2, dtype=torch.long))
    images, masks = collate([a, b])
    assert images.shape == (2, 3, 3, 3) and masks.shape == (2, 3, 3)
    assert masks[0, 2].tolist() == [IGNORE_INDEX] * 3 and masks[1, :, 2].tolist() == [IGNORE_INDEX] * 3
    assert images[0, :, 2].abs().sum() == 0


def test_demo_is_deterministic_and_uses_offroad_ids(tmp_path):
    splits, size = {"train": 2, "val": 1}, (48, 64)
    a = make_demo(tmp_path / "a", seed=3, splits=splits, size=size)
    b = make_demo(tmp_path / "b", seed=3, splits=splits, size=size)
    c = make_demo(tmp_path / "c", seed=4, splits=splits, size=size)
    for rel in ("train/Color_Images/0001.png", "train/Segmentation/0001.png", "val/Segmentation/0000.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "train/Color_Images/0000.png").read_bytes() != (c / "train/Color_Images/0000.png").read_bytes()
    raw = read_mask(a / "train/Segmentation/0000.png")
    assert set(np.unique(raw).tolist()) <= {r for r, _ in OFFROAD_CLASSES} and {7100, 10000} <= set(
        raw.flatten().tolist()
    )


def run_cli(args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        dataset.main(dataset.get_args_parser().parse_args(args))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_missing_folder_is_one_line(tmp_path):
    assert str(tmp_path / "nope") in run_cli(["--data", str(tmp_path / "nope")])


def test_image_without_mask_names_it(tmp_path):
    root = offroad_root(tmp_path, [np.array([[100]])])
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "train" / "Color_Images" / "orphan.png")
    assert "orphan.png" in run_cli(["--data", str(root)])


def test_mask_of_other_size_names_it(tmp_path):
    root = offroad_root(tmp_path, [np.array([[100, 100]])])
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / "train" / "Segmentation" / "0.png")
    message = run_cli(["--data", str(root)])
    assert "Segmentation/0.png" in message and "3x3" in message


def test_unreadable_file_names_it(tmp_path):
    root = offroad_root(tmp_path, [np.array([[100]])])
    (root / "train" / "Color_Images" / "0.png").write_bytes(b"not a png")
    assert "Color_Images/0.png" in run_cli(["--data", str(root)])


def test_empty_split_is_one_line(tmp_path):
    (tmp_path / "train" / "Color_Images").mkdir(parents=True)
    (tmp_path / "train" / "Segmentation").mkdir(parents=True)
    assert "no images" in run_cli(["--data", str(tmp_path)])


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid is read from ../shared/data/camvid")
def test_camvid_folder_layout_treats_label_11_as_ignored():
    ds = build_dataset(CAMVID, "auto", "val", PLAIN, ClassOptions(num_classes=11))
    assert len(ds) == 101
    image, mask = ds[0]
    assert image.shape == (3, 360, 480) and mask.shape == (360, 480)
    raw = read_mask(ds.pairs[0][1])
    assert torch.equal(mask == IGNORE_INDEX, torch.from_numpy(raw == 11))
    assert mask[mask != IGNORE_INDEX].max() <= 10


def test_decoded_cache_gives_the_same_samples_and_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = offroad_root(tmp_path / "data", [np.array([[100, 200], [0, 7100]]), np.full((3, 2), 10000)])
    cfg = TransformConfig(scale=(0.5, 2.0), crop=(2, 2))
    plain, cached = (
        build_dataset(root, "offroad", "train", cfg),
        build_dataset(root, "offroad", "train", cfg, cache=True),
    )
    for i in range(2):
        torch.manual_seed(i)
        a = plain[i]
        torch.manual_seed(i)
        b = cached[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    (marker,) = (tmp_path / "cache").rglob("COMPLETE")
    stamp = marker.stat().st_mtime_ns
    build_dataset(root, "offroad", "train", cfg, cache=True)
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_pipeline_benchmark_prints_its_three_figures(tmp_path, capsys):
    root = offroad_root(tmp_path, [np.full((16, 24), 100), np.full((16, 24), 7100)])
    dataset.main(
        dataset.get_args_parser().parse_args(
            ["--data", str(root), "--crop", "8", "--scale", "0.5", "2", "--benchmark", "4"]
        )
    )
    last = capsys.readouterr().out.splitlines()[-3:]
    assert [line.split(":")[0] for line in last] == ["pipeline", "baseline", "ratio"]
    ours, reference, ratio = (float(line.split()[1]) for line in last)
    assert ratio == pytest.approx(ours / reference, rel=0.01)
