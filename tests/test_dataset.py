import colorsys
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CAMVID,
    check,
    counts_of,
    png_header_only,
    random_masks,
    run_cli,
    save_rgb,
    write_folder,
    write_pair,
)
from PIL import Image, ImageOps

import dataset
from dataset import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFROAD_CLASSES,
    ClassOptions,
    ClassRow,
    ClassTable,
    DatasetError,
    TransformConfig,
    build_dataset,
    class_map_of,
    class_weights,
    collate,
    enet_class_weights,
    make_demo,
    normalize,
    numbered_table,
    offroad_table,
    read_mask,
    split_statistics,
    transform_pair,
)

PLAIN = TransformConfig(train=False)


def offroad_root(tmp_path: Path, masks: list[np.ndarray], split: str = "train") -> Path:
    """The masks as one split of an offroad root, and a val split of one image (so nothing is held out of train)."""
    for i, mask in enumerate(masks):
        write_pair(
            tmp_path / split / "Color_Images" / f"{i}.png", tmp_path / split / "Segmentation" / f"{i}.png", mask, i
        )
    if split == "train":
        write_pair(tmp_path / "val" / "Color_Images" / "v.png", tmp_path / "val" / "Segmentation" / "v.png", masks[0])
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


def test_enet_weights_are_one_over_log_of_share_and_zero_for_absent_classes():
    counts = np.array([70, 20, 10, 0])  # shares 0.7, 0.2, 0.1 of the labelled pixels
    weights = enet_class_weights(counts)
    # 1 / ln(1.72), 1 / ln(1.22), 1 / ln(1.12), by hand
    assert weights.tolist() == pytest.approx([1.843915, 5.028895, 8.823891, 0.0], abs=1e-6)
    assert enet_class_weights(np.array([1, 10**9])).max() < 1 / math.log(1.02)  # bounded, as ENet meant


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


def test_low_res_epochs_train_at_half_size_and_crop_then_at_full(tmp_path):
    # progressive resizing: the dataset reads the epoch from the sampler's (epoch, index) keys, so DataLoader
    # workers that live across epochs switch too; validation (train=False) never changes
    columns = np.tile(np.arange(40, dtype=np.uint8), (20, 1))  # value = source column
    root = write_folder(tmp_path, "train", [columns, columns])
    write_folder(tmp_path, "val", [columns])
    cfg = TransformConfig(size=(20, 40), crop=(8, 16), hflip=False, low_res_epochs=2)
    classes = ClassOptions(num_classes=40)
    train = build_dataset(root, "auto", "train", cfg, classes)
    assert [tuple(train[(epoch, 0)][1].shape) for epoch in (1, 2, 3)] == [(4, 8), (4, 8), (8, 16)]
    assert tuple(train[0][1].shape) == (8, 16)  # a plain index (no epoch): full resolution
    whole = build_dataset(root, "auto", "train", TransformConfig(size=(20, 40), hflip=False, low_res_epochs=1), classes)
    half = whole[(1, 0)][1]  # the whole image at half size: each output column is one of its two source columns
    assert half.shape == (10, 20) and all(half[0, i] in (2 * i, 2 * i + 1) for i in range(20))
    val = build_dataset(root, "auto", "val", TransformConfig(size=(20, 40), train=False, low_res_epochs=5), classes)
    assert tuple(val[(1, 0)][1].shape) == (20, 40)


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


def test_hue_rotation_moves_the_hsv_hue_by_the_factor_and_keeps_greys():
    # colorsys computes the hue independently of the rotation matrix
    colours = [(200, 50, 50), (50, 200, 50), (50, 50, 200), (200, 200, 50), (200, 120, 50), (90, 60, 200), (128,) * 3]
    image = torch.tensor(colours, dtype=torch.uint8).T.reshape(3, 1, len(colours))
    for factor in (-0.02, -0.01, 0.0, 0.01, 0.02):
        out = dataset.rotate_hue(image, factor)[:, 0].T.tolist()
        for before, after in zip(colours, out):
            if len(set(before)) == 1:
                assert after == list(before)
                continue
            h0 = colorsys.rgb_to_hsv(*(v / 255 for v in before))[0]
            h1 = colorsys.rgb_to_hsv(*(v / 255 for v in after))[0]
            assert abs((h1 - h0 + 0.5) % 1 - 0.5 - factor) < 0.003, (before, factor)


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


# ---- class tables and mask encodings ---------------------------------------------------------------------------------

RGB = np.array([[128, 0, 0], [0, 128, 0], [0, 0, 200], [9, 9, 9]], np.uint8)  # red, green, blue, and a stray colour
RGB_TABLE = "name,r,g,b\nred,128,0,0\ngreen,0,128,0\nblue,0,0,200\n"


def binary_mask(high: int) -> np.ndarray:
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 3:6] = high
    return mask


@pytest.mark.parametrize("high, why", [(255, "only 0 and 255, so 255 is the foreground"), (1, "only 0 and 1")])
def test_binary_masks_read_their_high_value_as_the_foreground(tmp_path, high, why):
    root = write_folder(tmp_path, "train", [binary_mask(high), np.zeros((6, 8), np.uint8)])
    for options in (ClassOptions(), ClassOptions(num_classes=2)):
        ds = build_dataset(root, "auto", "train", PLAIN, options)
        assert ds.class_map.encoding == "binary" and ds.class_map.names == ("background", "foreground")
        assert why in ds.why
        assert ds[0][1].tolist() == (binary_mask(high) > 0).astype(int).tolist()


def test_colour_masks_follow_the_table_and_stray_colours_are_ignored_and_counted(tmp_path):
    ids = np.array([[0, 1, 2, 3], [2, 1, 0, 0]])
    root = write_folder(tmp_path, "train", [RGB[ids]])
    (tmp_path / "classes.csv").write_text(RGB_TABLE)
    ds = build_dataset(root, "auto", "train", PLAIN, ClassOptions(table=tmp_path / "classes.csv"))
    assert ds.class_map.encoding == "colour" and ds.class_map.names == ("red", "green", "blue")
    assert ds[0][1].tolist() == [[0, 1, 2, IGNORE_INDEX], [2, 1, 0, 0]]
    assert ds.class_map.palette.tolist() == RGB[:3].tolist()  # pictures draw each class in its own colour
    stats = split_statistics(ds.pairs, ds.class_map)
    assert stats.pixels.tolist() == [3, 2, 2] and stats.ignored == 1 and stats.unknown == 1
    assert stats.unknown_values == {9 << 16 | 9 << 8 | 9: [1, [ds.pairs[0][1]]]}


def test_colour_masks_without_a_table_stop_with_their_colour_count(tmp_path):
    root = write_folder(tmp_path, "train", [RGB[np.array([[0, 1], [2, 3]])]])
    with pytest.raises(DatasetError) as e:
        build_dataset(root, "auto", "train", PLAIN)
    message = str(e.value)
    assert "4 distinct colours" in message and "--write-classes" in message and "\n" not in message


def test_an_id_table_maps_16_bit_ids_merges_rows_of_one_name_and_knows_ignore(tmp_path):
    root = write_folder(tmp_path, "train", [np.array([[7100, 10000, 300, 0, 555]])])
    (tmp_path / "ids.csv").write_text("name,id\nground,7100\nsky,10000\nground,300\nignore,0\n")
    ds = build_dataset(root, "auto", "train", PLAIN, ClassOptions(table=tmp_path / "ids.csv"))
    assert ds.class_map.names == ("ground", "sky") and ds.class_map.encoding == "index"
    assert ds[0][1].tolist() == [[0, 1, 0, IGNORE_INDEX, IGNORE_INDEX]]
    stats = split_statistics(ds.pairs, ds.class_map)
    assert stats.ignored == 2 and stats.unknown_values.keys() == {555}  # 0 is ignored on purpose, 555 is a stray


def test_rgb_masks_whose_channels_are_equal_are_read_as_ids(tmp_path):
    ids = np.array([[0, 1, 2], [2, 2, 1]], np.uint8)
    root = write_folder(tmp_path, "train", [np.repeat(ids[..., None], 3, axis=-1)])
    ds = build_dataset(root, "auto", "train", PLAIN, ClassOptions(num_classes=3))
    assert ds.class_map.encoding == "index" and ds[0][1].tolist() == ids.tolist()


def test_lossy_jpeg_colour_masks_match_their_classes_and_count_the_rest(tmp_path):
    ids = np.zeros((64, 64), int)
    ids[:, 32:], ids[32:, :16] = 1, 2
    root = write_folder(tmp_path, "train", [RGB[ids]], suffix=".jpg")
    (tmp_path / "classes.csv").write_text(RGB_TABLE)
    ds = build_dataset(root, "auto", "train", PLAIN, ClassOptions(table=tmp_path / "classes.csv"))
    mask = ds[0][1].numpy()
    matched = mask != IGNORE_INDEX
    assert (mask[matched] == ids[matched]).all() and matched.mean() > 0.9
    stats = split_statistics(ds.pairs, ds.class_map)
    assert stats.lossy == 1 and stats.unknown_lossy == (~matched).sum() and stats.unknown_values == {}


def test_lossy_values_match_a_class_only_within_half_the_gap_to_the_next():
    # an independent brute-force nearest-key search over every 8-bit value, and over random colours
    ids = class_map_of(numbered_table(3), "index")  # keys 0, 1, 2 and 255: gap 1, so lossy matching stays exact
    assert ids.lookup(np.arange(256), lossy=True)[1].sum() == 4
    grey = class_map_of(ClassTable((ClassRow("a", 0), ClassRow("b", 10), ClassRow("c", 200)), "t"), "index")
    tolerance = min(dataset.LOSSY_TOLERANCE, (10 - 1) // 2)
    classes, known = grey.lookup(np.arange(65536), lossy=True)
    for v in range(300):
        near = [(abs(v - key), i) for i, key in enumerate((0, 10, 200)) if abs(v - key) <= tolerance]
        assert known[v] == bool(near) and classes[v] == (min(near)[1] if near else IGNORE_INDEX)
    colours = ClassTable(tuple(ClassRow(str(i), colour=tuple(c)) for i, c in enumerate(RGB[:3])), "t")
    colour_map = class_map_of(colours, "colour")
    rgb = np.random.default_rng(0).integers(0, 256, (5000, 3))
    rgb[:2500] = RGB[rgb[:2500, 0] % 3] + np.random.default_rng(1).integers(-30, 31, (2500, 3))
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    classes, known = colour_map.lookup(dataset.pack_rgb(rgb), lossy=True)
    distance = np.abs(rgb[:, None].astype(int) - RGB[None, :3].astype(int)).max(-1)  # [5000, 3]
    expected = np.where(distance.min(1) <= dataset.LOSSY_TOLERANCE, distance.argmin(1), IGNORE_INDEX)
    assert classes.tolist() == expected.tolist() and known.tolist() == (expected != IGNORE_INDEX).tolist()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("id,r,g,b\n1,2,3,4\n", "row 1: the header has no `name` column"),
        ("name,r,g\na,1,2\n", "row 1: colours need all three columns r,g,b"),
        ("name,id\na,1\nb,1\n", "row 3: id 1 is already the id of row 2"),
        ("name,r,g,b\na,1,2,3\nb,1,2,3\n", "row 3: colour (1, 2, 3) is already the colour of row 2"),
        ("name,id\na,x\n", "row 2: id 'x' is not a whole number"),
        ("name,id\na,1,2\n", "row 2: 3 cells for 2 columns"),
        ("name,r,g,b\na,1,2,300\n", "row 2: b 300 is outside 0..255"),
        ("name\na\na\n", "row 3: class 'a' is listed twice"),
        ("name,id\n,4\n", "row 2: the name is empty"),
        ("# a comment\n\n", "is empty"),
        ("name,id\nignore,0\n", "lists no class"),
    ],
)
def test_a_malformed_class_table_is_one_line_naming_the_file_and_row(tmp_path, text, needle):
    root = write_folder(tmp_path / "data", "train", [np.array([[0, 1]])])
    (tmp_path / "bad.csv").write_text(text)
    message = run_cli(["--data", str(root), "--classes", str(tmp_path / "bad.csv")])
    assert "bad.csv" in message and needle in message


def test_mask_values_count_exactly_what_read_mask_reads(tmp_path):
    ids = np.random.default_rng(0).integers(0, 4, (5, 7))
    files = {"l.png": Image.fromarray(ids.astype(np.uint8)), "i16.png": Image.fromarray((ids * 3000).astype(np.uint16)),
             "grey.png": Image.fromarray(np.repeat((ids * 60).astype(np.uint8)[..., None], 3, -1)),
             "rgb.png": Image.fromarray(RGB[ids]), "bits.png": Image.fromarray(ids > 1)}
    palette = Image.frombytes("P", (7, 5), ids.astype(np.uint8).tobytes())
    palette.putpalette(RGB.ravel().tolist())
    files["p.png"] = palette
    for name, image in files.items():
        image.save(tmp_path / name)
        for colour in {"rgb.png": (True,), "p.png": (False, True)}.get(name, (False,)):
            values, pixels, size = dataset.mask_values(tmp_path / name, colour)
            raw = read_mask(tmp_path / name, colour)
            expected = np.unique(dataset.pack_rgb(raw) if colour else raw, return_counts=True)
            assert values.tolist() == expected[0].tolist() and pixels.tolist() == expected[1].tolist(), name
            assert size == (7, 5)
    assert read_mask(tmp_path / "p.png").tolist() == ids.tolist()  # palette masks hold indices


def test_counting_by_histogram_equals_mapping_every_pixel(tmp_path):
    raw = np.random.default_rng(0).integers(0, 40, (30, 30))
    # 254 classes: too many for apply's one-step lookup (its marker for unknown values is 254), so the other path
    for class_map in (class_map_of(numbered_table(12), "index"), class_map_of(offroad_table(), "index"),
                      class_map_of(numbered_table(254), "index")):
        values, pixels = np.unique(raw, return_counts=True)
        counts, strange = class_map.count(values, pixels)
        mapped, unknown = class_map.apply(raw)
        by_pixel = np.bincount(mapped.ravel(), minlength=256)
        assert counts.tolist() == [*by_pixel[: class_map.num_classes].tolist(), by_pixel[IGNORE_INDEX]]
        assert sum(strange.values()) == unknown


def test_fast_png_decoding_gives_exactly_pillows_pixels(tmp_path, monkeypatch):
    pytest.importorskip("pyspng")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ids16 = rng.integers(0, 65536, (37, 53)).astype(np.uint16)
    palette = Image.fromarray(rgb[..., 0] % 7, "P")
    palette.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    files = {
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., 1]]), "RGBA"),
        "grey.png": Image.fromarray(rgb[..., 0]),
        "palette.png": palette,
        "grey16.png": Image.fromarray(ids16),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    kinds = ((8, 0), (8, 2), (8, 6))
    fast_path = {name for name in files if dataset.fast_png((tmp_path / name).read_bytes(), kinds, "RGB") is not None}
    assert fast_path == {"rgb.png", "rgba.png", "grey.png"}  # palettes and 16-bit files stay with Pillow

    def decode_all() -> dict[str, np.ndarray]:
        out = {name: dataset.read_image(tmp_path / name).permute(1, 2, 0).numpy() for name in files}
        out |= {f"{name} ids": read_mask(tmp_path / name) for name in ("grey.png", "palette.png", "grey16.png")}
        return out | {"rgb.png colours": read_mask(tmp_path / "rgb.png", colour=True)}

    fast = decode_all()
    monkeypatch.setattr(dataset, "pyspng", None)
    pillow = decode_all()
    for name in fast:
        assert fast[name].dtype == pillow[name].dtype and np.array_equal(fast[name], pillow[name]), name
    assert np.array_equal(fast["rgb.png"], rgb) and np.array_equal(fast["rgba.png"], rgb)  # what was written
    assert np.array_equal(fast["grey.png ids"], rgb[..., 0]) and np.array_equal(fast["grey16.png ids"], ids16)
    assert np.array_equal(fast["palette.png ids"], rgb[..., 0] % 7)


def test_a_file_the_fast_decoder_refuses_is_named_in_one_line(tmp_path):
    path = tmp_path / "broken.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])  # a valid header, a truncated image
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        dataset.read_image(path)


# ---- the dataset doctor (--check) --------------------------------------------------------------------------------


def test_check_reports_warnings_and_passes_a_dataset_that_can_train(tmp_path, capsys):
    a, b = np.array([[0, 1, 2, 2]] * 4), np.array([[0, 0, 1, 7]] * 4)  # class 2 only in train; 7 is no class
    root = write_folder(tmp_path, "train", [a, b])
    write_folder(root, "train", [a], suffix=".jpg", first=2)
    write_folder(root, "val", [np.array([[0, 1, 1, 0]] * 4)])
    write_folder(root, "test", [np.array([[0, 1, 255, 255]] * 2 + [[255] * 4] * 2)])  # mostly ignored
    shutil.copy(root / "train" / "images" / "0.png", root / "val" / "images" / "5.png")  # a leaked image
    shutil.copy(root / "val" / "masks" / "0.png", root / "val" / "masks" / "5.png")
    shutil.copy(root / "val" / "masks" / "0.png", root / "train" / "masks" / "orphan.png")
    status, lines = check(["--data", str(root), "--num-classes", "4"], capsys)
    text = "\n".join(lines)
    assert status == 0
    assert lines[1].startswith("masks: index, 4 classes from --num-classes 4")
    row = next(line for line in lines if line.split()[:2] == ["2", "class_2"])
    assert row.split("|")[1].split() == ["16", "36.36%", "2"] and row.split("|")[2].split() == ["0", "0.00%", "0"]
    assert "ignored pixels: train 4 (8.3%; 4 of no class), val 0 (0.0%; 0 of no class), test 12 (75.0%;" in text
    assert "warning: test: 75% of the pixels are ignored" in text
    assert "warning: train: never present, so never learned: class_3" in text
    assert "warning: val: never present, so their IoU is n/a: class_2, class_3" in text
    assert "warning: train: value 7 is in no class: 4 pixels in 1.png" in text
    assert "warning: train: 1 masks are lossy (JPEG)" in text
    assert "warning: train: 1 masks have no image: orphan.png" in text
    assert re.search(r"warning: the same image is in two splits .*train/images/0.png \(train\) = .*5.png \(val\)", text)
    assert lines[-2] == "verdict: ready to train (8 warnings)"  # test lacks classes 2 and 3 too
    assert lines[-1] == f"  python train_deeplab.py --data {root} --num-classes 4"


def test_check_fails_on_what_would_stop_or_spoil_training(tmp_path, capsys):
    root = write_folder(tmp_path, "train", [np.array([[0, 1]] * 2)] * 3)
    write_folder(root, "val", [np.full((2, 2), 255)])
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / "train" / "masks" / "1.png")  # another size
    (root / "train" / "masks" / "2.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "train" / "images" / "lonely.png")
    image = root / "train" / "images" / "0.png"
    image.write_bytes(image.read_bytes()[:45])  # a valid header, then the data stops
    status, lines = check(["--data", str(root), "--num-classes", "2"], capsys)
    text = "\n".join(lines)
    assert status == 1
    assert "masks/1.png is 3x3 but image" in text and "cannot read mask" in text and "masks/2.png" in text
    assert "error: train: 1 images have no mask: lonely.png" in text and "error: val: every pixel is ignored" in text
    assert re.search(r"error: cannot read image .*images/0.png", text)
    assert lines[-2].startswith("verdict: training would fail or train wrongly (5 errors)")


def test_check_catches_binary_masks_read_with_255_as_ignore(tmp_path, capsys):
    root = write_folder(tmp_path, "train", [binary_mask(255)] * 2)
    write_folder(root, "val", [binary_mask(255)])
    status, lines = check(["--data", str(root), "--num-classes", "11"], capsys)
    assert status == 1 and any("hold only 0 and 255, and 255 is read as ignore" in line for line in lines)
    status, lines = check(["--data", str(root)], capsys)
    assert status == 0 and lines[1].startswith("masks: binary, 2 classes")
    assert lines[-1] == f"  python train_deeplab.py --data {root}"


def test_check_writes_a_class_table_for_colour_masks_and_never_overwrites_it(tmp_path, capsys):
    ids = np.array([[0, 0, 0, 2, 2, 1]] * 2)
    root = write_folder(tmp_path / "data", "train", [RGB[ids]])
    write_folder(root, "val", [RGB[ids]])
    status, lines = check(["--data", str(root)], capsys)
    assert status == 1 and "3 distinct colours" in "\n".join(lines)
    table = tmp_path / "classes.csv"
    status, lines = check(["--data", str(root), "--write-classes", str(table)], capsys)
    assert status == 0 and lines[-1] == f"  python train_deeplab.py --data {root} --classes {table}"
    rows = [line for line in table.read_text().splitlines() if not line.startswith("#")]
    assert rows == ["name,r,g,b", "class_0,128,0,0", "class_1,0,0,200", "class_2,0,128,0"]  # most pixels first
    assert "# (128, 0, 0): 6 pixels in 1 masks" in table.read_text()
    before = table.read_bytes()
    assert "exists" in run_cli(["--data", str(root), "--check", "--write-classes", str(table)])
    assert table.read_bytes() == before


CAMVID_COLOURS = (
    "name,r,g,b\nSky,128,128,128\nBuilding,128,0,0\nPole,192,192,128\nRoad,128,64,128\nPavement,60,40,222\n"
    "Tree,128,128,0\nSignSymbol,192,128,128\nFence,64,64,128\nCar,64,0,128\nPedestrian,64,64,0\nBicyclist,0,128,192\n"
    "ignore,0,0,0\n"
)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid is read from ../shared/data/camvid")
def test_camvid_masks_re_encoded_as_colours_give_exactly_the_index_counts(tmp_path):
    palette = np.array([row.split(",")[1:] for row in CAMVID_COLOURS.splitlines()[1:]], np.uint8)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (tmp_path / split / sub).mkdir(parents=True)
        for image in sorted((CAMVID / split / "images").iterdir())[:6]:
            (tmp_path / split / "images" / image.name).symlink_to(image)
            ids = read_mask(CAMVID / split / "masks" / image.name)
            Image.fromarray(palette[ids]).save(tmp_path / split / "masks" / image.name)
    (tmp_path / "camvid.csv").write_text(CAMVID_COLOURS)
    coloured = build_dataset(tmp_path, "auto", "train", PLAIN, ClassOptions(table=tmp_path / "camvid.csv"))
    assert coloured.class_map.encoding == "colour"
    colour_stats = split_statistics(coloured.pairs, coloured.class_map)
    index = build_dataset(CAMVID, "auto", "train", PLAIN, ClassOptions(num_classes=11))
    index_stats = split_statistics(index.pairs[:6], index.class_map)
    direct = sum(np.bincount(read_mask(mask).ravel(), minlength=12) for _, mask in index.pairs[:6])
    assert colour_stats.pixels.tolist() == index_stats.pixels.tolist() == direct[:11].tolist()
    assert colour_stats.images.tolist() == index_stats.images.tolist()
    assert colour_stats.ignored == index_stats.ignored == direct[11] and colour_stats.unknown == 0


@pytest.mark.parametrize("turn", range(1, 9))
def test_photos_read_the_way_up_their_exif_tag_says(tmp_path, turn):
    """A phone stores the sensor's pixels and an orientation tag; the mask is drawn on the photo as shown."""
    shown = np.zeros((32, 48, 3), np.uint8)
    shown[:, :24], shown[:16, 24:] = (250, 10, 10), (10, 10, 250)  # left red, top right blue, bottom right black
    mask = np.zeros((32, 48), np.uint8)
    mask[:, :24], mask[:16, 24:] = 1, 2
    stored = Image.fromarray(shown).transpose(
        {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}[turn]) if turn > 1 else Image.fromarray(shown)
    exif = Image.Exif()
    exif[0x0112] = turn
    write_folder(tmp_path, "val", [mask])
    (tmp_path / "val" / "images" / "0.png").unlink()
    stored.save(tmp_path / "val" / "images" / "0.jpg", exif=exif.tobytes(), quality=100)
    with Image.open(tmp_path / "val" / "images" / "0.jpg") as im:
        reference = np.asarray(ImageOps.exif_transpose(im))  # Pillow's own turn, the one browsers show
    image, read = build_dataset(tmp_path, "folder", "val", PLAIN, ClassOptions(num_classes=3))[0]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), reference) and image.shape[1:] == (32, 48)
    for cls, colour in ((1, (250, 10, 10)), (2, (10, 10, 250)), (0, (0, 0, 0))):  # JPEG blurs the edges only
        assert np.abs(np.median(image.permute(1, 2, 0).numpy()[read.numpy() == cls], 0) - colour).max() < 12


def test_a_mask_with_an_exif_tag_is_turned_too(tmp_path):
    mask = np.array([[1, 2, 0]], np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "m.png"
    Image.fromarray(mask).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())
    assert read_mask(path).tolist() == mask.tolist() and dataset.image_size(path) == (3, 1)


def test_a_split_is_held_out_by_file_name_hash_and_adding_images_moves_no_other(tmp_path, capsys):
    root = write_folder(tmp_path, "train", random_masks([0, 1], 30))
    val = build_dataset(root, "auto", "val", PLAIN, ClassOptions(num_classes=2))
    train = build_dataset(root, "auto", "train", PLAIN, ClassOptions(num_classes=2))
    held = {image.name for image, _ in val.pairs}
    by_hand = {f"{i}.png" for i in range(30) if dataset.name_hash(f"{i}.png") < 0.1}
    assert held == (by_hand or held) and len(held) >= 1 and len(train) + len(val) == 30
    assert not held & {image.name for image, _ in train.pairs}
    assert "held out as val (--val-fraction 0.1" in "\n".join(train.about)
    write_folder(root, "train", random_masks([0, 1], 30, seed=1), first=30)
    more = build_dataset(root, "auto", "val", PLAIN, ClassOptions(num_classes=2))
    assert held <= {image.name for image, _ in more.pairs}  # the old ones stayed where they were
    status, lines = check(["--data", str(root), "--num-classes", "2"], capsys)
    assert status == 0 and f"val ({len(more)})" in lines[0]


def test_val_fraction_with_a_real_validation_split_is_an_error(tmp_path):
    root = write_folder(tmp_path, "train", random_masks([0, 1], 3))
    write_folder(root, "val", random_masks([0, 1], 1))
    out = run_cli(["--data", str(root), "--num-classes", "2", "--val-fraction", "0.2"])
    assert "--val-fraction" in out and "has a validation split (val, 1 images)" in out


def test_gif_masks_and_tiff_images_pair_as_drive_ships_them(tmp_path):
    """DRIVE: TIFF images, GIF masks of 0 and 255 (the vessels)."""
    masks = [np.where(m == 1, 255, 0).astype(np.uint8) for m in random_masks([0, 1], 3)]
    for split in ("train", "val"):
        for i, mask in enumerate(masks):
            save_rgb(tmp_path / split / "images" / f"{i}_training.tif", mask.shape, i)
            (tmp_path / split / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask).save(tmp_path / split / "masks" / f"{i}_training.gif")
    ds = build_dataset(tmp_path, "auto", "train", PLAIN)
    assert ds.class_map.encoding == "binary" and len(ds) == 3
    assert split_statistics(ds.pairs, ds.class_map).pixels.tolist() == counts_of(masks, [0, 255])


def test_masks_that_pair_with_no_image_name_one_and_why(tmp_path):
    save_rgb(tmp_path / "train" / "images" / "21_training.tif", (4, 4))
    (tmp_path / "train" / "masks").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train" / "masks" / "21_manual1.gif")
    assert "21_manual1.gif has no image of its stem '21_manual1'" in run_cli(["--data", str(tmp_path), "--check"])
    (tmp_path / "train" / "masks" / "21_manual1.gif").unlink()
    np.save(tmp_path / "train" / "masks" / "21_training.npy", np.zeros((4, 4)))
    assert "has suffix .npy, which is no image format Pillow reads" in run_cli(["--data", str(tmp_path), "--check"])


def test_a_test_split_of_images_alone_is_no_split_and_is_said(tmp_path):
    root = write_folder(tmp_path, "train", random_masks([0, 1], 2))
    write_folder(root, "val", random_masks([0, 1], 1))
    save_rgb(root / "test" / "images" / "unlabelled.png", (12, 16))
    train = build_dataset(root, "auto", "train", PLAIN, ClassOptions(num_classes=2))
    assert len(train) == 2 and train.about[0] == "layout folder: splits train (2) and val (1)"
    assert train.about[1] == f"{root / 'test' / 'images'} has no masks/ folder beside it: not a split"
    with pytest.raises(DatasetError, match="has no split 'test'"):
        build_dataset(root, "auto", "test", PLAIN, ClassOptions(num_classes=2))


# ---- the pixel limit, and masks of values that are no class ----


def test_a_bomb_is_refused_by_the_default_limit_before_decoding(tmp_path):
    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    for read in (dataset.read_image, dataset.read_mask, dataset.mask_values, dataset.image_size):
        with pytest.raises(DatasetError, match=r"bomb.png has 400,000,000 pixels, over the limit of 89,478,485"):
            read(tmp_path / "bomb.png")


@pytest.mark.parametrize("suffix, mode", [(".png", "RGB"), (".png", "L"), (".png", "I;16"), (".jpg", "RGB"),
                                          (".tif", "L"), (".gif", "P")])
def test_every_decode_path_refuses_a_file_over_the_pixel_limit(tmp_path, monkeypatch, suffix, mode):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (31, 32):  # 961 pixels pass, 1024 do not
        path = tmp_path / f"{side}{suffix}"
        Image.new(mode, (side, side)).save(path)
        readers = [dataset.read_mask, dataset.mask_values, dataset.image_size] + (
            [dataset.read_image] if mode == "RGB" else [])
        for read in readers:
            if side == 31:
                read(path)
            else:
                with pytest.raises(DatasetError, match=f"{side}{re.escape(suffix)} has 1,024 pixels, over the limit"):
                    read(path)


def test_max_pixels_raises_the_limit_for_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the command sets it; put it back after
    root = write_folder(tmp_path, "train", random_masks([0, 1], 2, (40, 40)))
    assert "--max-pixels 1600 raises it" in run_cli(["--data", str(root), "--max-pixels", "1000"])
    dataset.main(dataset.get_args_parser().parse_args(["--data", str(root), "--max-pixels", "1600"]))
    assert "1 images in split 'train'" in capsys.readouterr().out


def save_tiff(path: Path, values: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values, mode=mode).save(path)


def test_float_and_32_bit_tiff_masks_read_whole_ids_and_refuse_anything_else(tmp_path):
    ids = np.array([[0, 1, 2, 3], [300, 2, 1, 0]])
    save_tiff(tmp_path / "whole.tif", ids.astype(np.float32), "F")
    save_tiff(tmp_path / "int.tif", ids.astype(np.int32), "I")
    for name in ("whole.tif", "int.tif"):
        assert dataset.read_mask(tmp_path / name).tolist() == ids.tolist()
    for values, mode, shown in ((ids + 0.5, "F", "0.5"), (ids - 1, "I", "-1"), (ids * np.nan, "F", "nan")):
        save_tiff(tmp_path / "bad.tif", values.astype(np.float32 if mode == "F" else np.int32), mode)
        with pytest.raises(DatasetError, match=f"bad.tif .* holds values that are no class index, e.g. {shown}"):
            dataset.read_mask(tmp_path / "bad.tif")


@pytest.mark.parametrize("layout", [layout for layout in dataset.LAYOUTS if layout not in ("auto", "folder", "demo")])
def test_a_forced_layout_the_data_is_not_says_so_naming_the_flag(tmp_path, layout):
    root = write_folder(tmp_path / "data", "train", random_masks([0, 1], 2))
    message = run_cli(["--data", str(root), "--layout", layout, "--check"])
    assert message.startswith(f"error: --layout {layout}: {root} holds no ")
    assert message.endswith("; it reads as folder without the flag")
