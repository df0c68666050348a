import base64
import io
import json
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import CAMVID, check, counts_of, random_masks, run_cli, save_rgb
from PIL import Image, ImageDraw

import annotations
import dataset
from dataset import DatasetError, TransformConfig, build_dataset, read_mask, split_statistics

PLAIN = TransformConfig(train=False)


# ---- trees of masks: voc, cvat, labelme2voc, roboflow -----------------------------------------------------------

VOC_FIRST_COLOURS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128)]  # the devkit's


def save_palette_mask(path: Path, mask: np.ndarray) -> None:
    """A palette PNG of class indices, as the VOC devkit and labelme's lblsave write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(annotations.voc_colormap(256).ravel().tolist())
    im.save(path)


def voc_tree(base: Path, masks: dict[str, np.ndarray], lists: dict[str, list[str]]) -> None:
    for i, (name, mask) in enumerate(masks.items()):
        save_rgb(base / "JPEGImages" / f"{name}.jpg", mask.shape, i)
        save_palette_mask(base / "SegmentationClass" / f"{name}.png", mask)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, names in lists.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def test_voc_colours_follow_the_devkit():
    assert [tuple(c) for c in annotations.voc_colormap(6).tolist()] == VOC_FIRST_COLOURS


def test_voc_tree_reads_palette_indices_with_voc_classes_and_255_as_void(tmp_path, capsys):
    masks = dict(zip([f"2007_{i:06d}" for i in range(5)], random_masks([0, 1, 15, 20, 255], 5)))
    names = list(masks)
    voc_tree(tmp_path / "VOCdevkit" / "VOC2012", masks, {"train": names[:3], "val": names[3:], "trainval": names})
    train = build_dataset(tmp_path, "auto", "train", PLAIN)
    assert train.class_map.num_classes == 21 and train.class_map.names[15] == "person"
    assert train.class_map.names[20] == "tvmonitor" and train.about[0].startswith("layout voc: the VOC table")
    stats = split_statistics(train.pairs, train.class_map)
    assert stats.pixels[[0, 1, 15, 20]].tolist() == counts_of(list(masks.values())[:3], [0, 1, 15, 20])
    assert stats.ignored == counts_of(list(masks.values())[:3], [255])[0] and stats.unknown == 0
    status, lines = check(["--data", str(tmp_path)], capsys)
    assert status == 0 and "splits train (3), val (2) and trainval (5)" in lines[0]
    assert "trainval pixels" not in "\n".join(lines) and "same image" not in "\n".join(lines)  # not read twice


def test_sbd_train_aug_reads_its_own_masks(tmp_path):
    base = tmp_path / "VOC2012"
    masks = dict(zip(["a", "b", "c"], random_masks([0, 3], 3)))
    voc_tree(base, masks, {"train": ["a", "b"], "val": ["c"]})
    (base / "SegmentationClassAug").mkdir()
    for name in ("a", "b"):  # grey PNGs of class indices, as SBD's augmented masks are shared
        Image.fromarray(np.full((12, 16), 7, np.uint8)).save(base / "SegmentationClassAug" / f"{name}.png")
    (base / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\nb\n")
    aug = build_dataset(tmp_path, "voc", "train_aug", PLAIN)
    assert [m.parent.name for _, m in aug.pairs] == ["SegmentationClassAug"] * 2
    assert aug.class_map.names[7] == "car"
    assert split_statistics(aug.pairs, aug.class_map).pixels[7] == 2 * 12 * 16


def test_check_names_what_a_voc_tree_gets_wrong(tmp_path, capsys):
    masks = dict(zip("abcde", random_masks([0, 1, 2], 5)))
    base = tmp_path / "VOC2012"
    voc_tree(base, masks, {"train": ["a", "b", "c", "ghost"], "val": ["d"]})  # e is in no list, ghost is nowhere
    (base / "SegmentationClass" / "c.png").unlink()  # a listed frame without its mask
    status, lines = check(["--data", str(tmp_path)], capsys)
    text = "\n".join(lines)
    assert status == 1 and "error: train: 1 images have no mask: c.jpg" in text
    assert "train.txt names 1 frames with no image in" in text and "ghost" in text
    assert "warning: 1 masks of" in text and "are in no list of" in text and "e.png" in text


CVAT_LABELMAP = (
    "# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:128,64,128::\ncar:64,0,128::\nsky:70,130,180::\n"
)
CVAT_COLOURS = [(0, 0, 0), (128, 64, 128), (64, 0, 128), (70, 130, 180)]


def cvat_export(root: Path, masks: list[np.ndarray], unmasked: int = 1) -> Path:
    """CVAT's "Segmentation mask 1.1" with images: RGB masks in labelmap.txt's colours, one `default` subset
    listing every frame, no mask for the frames without shapes."""
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "labelmap.txt").write_text(CVAT_LABELMAP)
    names = [f"frame_{i:06d}" for i in range(len(masks) + unmasked)]
    for i, name in enumerate(names):
        save_rgb(root / "JPEGImages" / f"{name}.jpg", masks[0].shape, i)
        if i < len(masks):
            (root / "SegmentationClass").mkdir(exist_ok=True)
            Image.fromarray(np.array(CVAT_COLOURS, np.uint8)[masks[i]]).save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "default.txt").write_text("\n".join(names) + "\n")
    return root


def test_cvat_export_reads_labelmap_colours_skips_frames_without_masks_and_holds_out_val(tmp_path, capsys):
    masks = random_masks([0, 1, 2, 3], 12)
    root = cvat_export(tmp_path / "cvat", masks)
    train = build_dataset(root, "auto", "train", PLAIN)
    val = build_dataset(root, "auto", "val", PLAIN, train.class_map)
    assert train.class_map.names == ("background", "road", "car", "sky") and train.class_map.encoding == "colour"
    splits = f"splits default ({len(train)}) and val ({len(val)})"
    assert train.about[0] == f"layout cvat: labelmap.txt with 4 labels, {splits}"
    assert any("1 frames have no mask (CVAT writes none" in line for line in train.about)
    assert len(train) + len(val) == 12 and len(val) >= 1
    pixels = sum(split_statistics(ds.pairs, train.class_map).pixels for ds in (train, val))
    assert pixels.tolist() == counts_of(masks, [0, 1, 2, 3])
    status, lines = check(["--data", str(root)], capsys)
    assert status == 0 and any(line.startswith("no validation split: ") for line in lines)


def labelme_tree(base: Path, masks: list[np.ndarray], first: int = 0) -> None:
    """labelme2voc.py's output: class_names.txt, JPEGImages/*.jpg and palette SegmentationClass/*.png."""
    base.mkdir(parents=True)
    (base / "class_names.txt").write_text("_background_\ncat\ndog\n")
    for i, mask in enumerate(masks, first):
        save_rgb(base / "JPEGImages" / f"img{i}.jpg", mask.shape, i)
        save_palette_mask(base / "SegmentationClass" / f"img{i}.png", mask)


def test_labelme_trees_per_split_read_class_names_and_255_as_ignore(tmp_path):
    train_masks, val_masks = random_masks([0, 1, 2, 255], 3), random_masks([0, 2, 255], 2, seed=1)
    labelme_tree(tmp_path / "train", train_masks)
    labelme_tree(tmp_path / "val", val_masks, first=3)
    train = build_dataset(tmp_path, "auto", "train", PLAIN)
    assert train.class_map.names == ("_background_", "cat", "dog") and train.about[0].startswith("layout labelme")
    val = build_dataset(tmp_path, "auto", "val", PLAIN, train.class_map)
    for ds, masks in ((train, train_masks), (val, val_masks)):
        stats = split_statistics(ds.pairs, ds.class_map)
        assert stats.pixels.tolist() == counts_of(masks, [0, 1, 2]) and stats.unknown == 0
        assert stats.ignored == counts_of(masks, [255])[0]


def roboflow_split(folder: Path, masks: list[np.ndarray], seed: int = 0) -> None:
    """Roboflow's Semantic Segmentation Masks: NAME.jpg beside NAME_mask.png, mangled names, _classes.csv."""
    folder.mkdir(parents=True)
    (folder / "_classes.csv").write_text("Pixel Value, Class\n0, background\n1, crack\n2, pothole\n")
    for i, mask in enumerate(masks):
        stem = f"road_{seed}{i:02d}_jpg.rf.{seed}{i:02d}aa9f1c0e2b7d"
        save_rgb(folder / f"{stem}.jpg", mask.shape, i)
        Image.fromarray(mask).save(folder / f"{stem}_mask.png")


def test_roboflow_export_pairs_mangled_names_and_valid_is_val(tmp_path):
    train_masks, valid_masks = random_masks([0, 1, 2], 4), random_masks([0, 1], 2, seed=1)
    roboflow_split(tmp_path / "train", train_masks)
    roboflow_split(tmp_path / "valid", valid_masks, seed=1)
    train = build_dataset(tmp_path, "auto", "train", PLAIN)
    val = build_dataset(tmp_path, "auto", "val", PLAIN, train.class_map)
    assert train.class_map.names == ("background", "crack", "pothole")
    assert train.about[0] == "layout roboflow: _classes.csv with 3 classes, splits train (4) and valid (2)"
    assert all(m.name == i.stem + "_mask.png" for i, m in train.pairs)
    assert split_statistics(val.pairs, val.class_map).pixels.tolist() == counts_of(valid_masks, [0, 1, 2])


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, by hand: run lengths over the column-major pixels, starting with a run of 0s."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"counts": ([0] + runs) if flat[0] else runs, "size": list(mask.shape)}


def rectangle(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


COCO_SHAPES = (  # (image, category index 1..3, x0, y0, x1, y1): categories 1 and 2 overlap on 2x2 pixels of image 0
    (0, 1, 0, 0, 6, 4), (0, 2, 4, 2, 9, 8), (1, 3, 2, 2, 12, 10), (1, 1, 13, 0, 16, 3),
)


def coco_export(root: Path, tool: str, shape: tuple[int, int] = (12, 16)) -> tuple[Path, np.ndarray]:
    """Two annotated images, one with no annotation and one whose file is missing, as `tool` writes COCO, and
    the expected mask of each annotated image by hand (overlaps 255)."""
    h, w = shape
    expected = np.zeros((2, h, w), np.uint8)
    for image, category, x0, y0, x1, y1 in COCO_SHAPES:
        region = expected[image, y0:y1, x0:x1]
        region[(region != 0) & (region != category)] = 255
        region[region == 0] = category
    first_id = 0 if tool == "label-studio" else 1  # Label Studio numbers categories from 0
    categories = [{"id": first_id + i, "name": n, "supercategory": ""} for i, n in enumerate(("car", "road", "tree"))]
    categories.append({"id": first_id + 3, "name": "bus", "supercategory": ""})  # never used
    if tool == "roboflow":  # the project category, supercategory of every other
        categories = [{"id": 0, "name": "streets", "supercategory": "none"}] + [
            {**c, "id": c["id"], "supercategory": "streets"} for c in categories]
    folder, json_path, prefix = {
        "cvat": (root / "images" / "default", root / "annotations" / "instances_default.json", ""),
        "roboflow": (root / "train", root / "train" / "_annotations.coco.json", ""),
        "label-studio": (root / "images", root / "result.json", "images/"),
    }[tool]
    files = ["a.jpg", "b.jpg", "empty.jpg", "gone.jpg"]
    for i, name in enumerate(files[:3]):
        save_rgb(folder / name, shape, i)
    annotations = []
    for n, (image, category, x0, y0, x1, y1) in enumerate(COCO_SHAPES):
        box = np.zeros(shape, np.uint8)
        box[y0:y1, x0:x1] = 1
        segmentation = uncompressed_rle(box) if tool == "cvat" else rectangle(x0, y0, x1, y1)
        annotations.append({"id": n + 1, "image_id": image + 1, "category_id": first_id + category - 1,
                            "segmentation": segmentation, "iscrowd": int(tool == "cvat"),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(box.sum())})
    annotations.append({"id": 99, "image_id": 4, "category_id": first_id, "segmentation": rectangle(0, 0, 2, 2)})
    annotations.append({"id": 100, "image_id": 77, "category_id": first_id, "segmentation": rectangle(0, 0, 2, 2)})
    images = [{"id": i + 1, "file_name": prefix + name, "width": w, "height": h} for i, name in enumerate(files)]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root, expected


@pytest.mark.parametrize("tool", ["cvat", "roboflow", "label-studio"])
def test_coco_rasterises_polygons_and_rle_overlaps_ignored_and_counted(tmp_path, tool, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, expected = coco_export(tmp_path / "export", tool)
    train = build_dataset(root, "auto", "train", PLAIN)
    assert train.class_map.names == ("background", "car", "road", "tree", "bus")
    pairs = {image.name: mask for image, mask in train.pairs}
    val = build_dataset(root, "auto", "val", PLAIN, train.class_map)
    pairs.update({image.name: mask for image, mask in val.pairs})
    assert sorted(pairs) == ["a.jpg", "b.jpg"]  # empty.jpg is skipped, gone.jpg is not there
    for i, name in enumerate(["a.jpg", "b.jpg"]):
        assert np.array_equal(read_mask(pairs[name]), expected[i])
    text = "\n".join(train.about)
    assert "overlap on 4 pixels in 1 images" in text and "no annotation uses the categories bus" in text
    assert "1 images have no annotation: skipped" in text and "1 annotated images are not there" in text
    assert "1 annotations are of images the file does not list" in text
    status, lines = check(["--data", str(root)], capsys)
    assert status == 0 and "layout coco: 4 categories" in lines[0]
    assert any("overlap on 4 pixels" in line for line in lines)


def zip_folder(folder: Path, path: Path, extra: list[tuple[zipfile.ZipInfo | str, bytes]] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, Path("export") / file.relative_to(folder))
        for info, data in extra:
            archive.writestr(info, data)
    return path


def test_a_zip_export_is_unpacked_once_beside_it_and_reused(tmp_path):
    roboflow_split(tmp_path / "export" / "train", random_masks([0, 1, 2], 3))
    roboflow_split(tmp_path / "export" / "valid", random_masks([0, 1], 1), seed=1)
    path = zip_folder(tmp_path / "export", tmp_path / "roboflow.zip", [("__MACOSX/export/._x", b"")])  # a Mac's zip
    shutil.rmtree(tmp_path / "export")
    first = build_dataset(path, "auto", "train", PLAIN)
    assert first.about[0].startswith("layout roboflow") and "unpacked 11 files into" in first.about[1]
    marker = tmp_path / "roboflow_unzipped" / ".unzipped-from"
    stamp = marker.stat().st_mtime_ns
    second = build_dataset(path, "auto", "train", PLAIN)
    assert "unpacked before" in second.about[1] and marker.stat().st_mtime_ns == stamp
    assert len(second) == 3


def link_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)  # what `zip --symlinks` writes for a link
    return info


@pytest.mark.parametrize(
    "member, needle",
    [("../evil.txt", "would land outside"), ("/etc/evil", "would land outside"),
     (link_member("export/link"), "is a link")],
)
def test_a_zip_member_that_would_land_outside_is_refused_in_one_line(tmp_path, member, needle):
    roboflow_split(tmp_path / "export" / "train", random_masks([0, 1], 2))
    path = zip_folder(tmp_path / "export", tmp_path / "bad.zip", [(member, b"x")])
    out = run_cli(["--data", str(path), "--check"])
    assert needle in out and "Traceback" not in out and not (tmp_path / "evil.txt").exists()


def test_a_zip_that_would_unpack_to_an_absurd_size_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(annotations, "ZIP_FLOOR", 2**20)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", bytes(8 * 2**20))
    with pytest.raises(DatasetError, match="times its own size"):
        build_dataset(tmp_path / "bomb.zip", "auto", "train", PLAIN)
    assert not (tmp_path / "bomb_unzipped").exists()


def coco_with_valid(root: Path) -> list[np.ndarray]:
    expected = coco_export(root, "roboflow")[1]
    shutil.copytree(root / "train", root / "valid")
    return [*expected, *expected]


def export_with(build: Callable, masks: list[np.ndarray]) -> list[np.ndarray]:
    build(masks)
    return masks


# each builds a small export in a folder and returns the class-index masks it wrote (255: ignored), every split's
EXPORTS = {
    "voc": lambda root: export_with(lambda m: voc_tree(root, dict(zip("abcdef", m)), {"train": list("abcd"),
                                    "val": list("ef")}), random_masks([0, 1, 15], 6)),
    "cvat": lambda root: export_with(lambda m: cvat_export(root, m), random_masks([0, 1, 2, 3], 6)),
    "labelme": lambda root: export_with(lambda m: labelme_tree(root, m), random_masks([0, 1, 2, 255], 6)),
    "roboflow": lambda root: export_with(lambda m: roboflow_split(root / "train", m), random_masks([0, 1, 2], 6)),
    "coco": coco_with_valid,
}


@pytest.mark.parametrize("layout", EXPORTS)
def test_each_export_reads_back_the_pixels_written_through_the_loader_stats_and_check(tmp_path, layout, monkeypatch,
                                                                                     capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "export"
    written = EXPORTS[layout](root)
    train = build_dataset(root, "auto", "train", PLAIN)
    val = build_dataset(root, "auto", "val", PLAIN, train.class_map)
    n = train.class_map.num_classes
    expected = np.bincount(np.concatenate([m[m != 255] for m in written]), minlength=n).tolist()
    loaded = [ds[i][1].numpy() for ds in (train, val) for i in range(len(ds))]
    assert np.bincount(np.concatenate([m[m != 255] for m in loaded]), minlength=n).tolist() == expected
    capsys.readouterr()
    from_stats = np.zeros(n, np.int64)
    for split in ("train", "val"):
        dataset.main(dataset.get_args_parser().parse_args(["--data", str(root), "--split", split, "--stats"]))
        rows = re.findall(r"^\s*(\d+)\s+\S+\s+(\d+)\s+\d+\.\d{6}(?:\s+\d+\.\d{4}){2}$", capsys.readouterr().out, re.M)
        from_stats += np.array([int(pixels) for _, pixels in rows])
    assert from_stats.tolist() == expected
    _, lines = check(["--data", str(root)], capsys)
    rows = [line.split("|") for line in lines if re.match(r"^\s*\d+ ", line) and "|" in line]
    assert [sum(int(cell.split()[0].replace(",", "")) for cell in row[1:]) for row in rows] == expected


@pytest.mark.parametrize("layout", EXPORTS)
def test_one_training_step_on_each_export(tmp_path, layout, monkeypatch, capsys):
    import train_deeplab

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    EXPORTS[layout](tmp_path / "export")
    args = ["--data", str(tmp_path / "export"), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
            "--workers", "0", "--no-pretrained", "--size", "32", "32", "--loss", "ce"]
    train_deeplab.main(train_deeplab.get_args_parser().parse_args(args))
    out = capsys.readouterr().out
    assert f"layout {layout}:" in out and "Epoch 1/1" in out and (tmp_path / "run" / "best.pth").is_file()
    if "held out as val" in out:  # the checkpoint alone finds the same held-out images again
        import evaluate

        report = tmp_path / "report.json"
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--checkpoint", str(tmp_path / "run" / "best.pth"), "--json", str(report), "--workers", "0"]))
        assert json.loads(report.read_text())["images"] == int(re.search(r"val size (\d+)", out).group(1))


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid is not in ../shared")
def test_camvid_frames_as_coco_rle_read_back_their_png_masks_pixel_for_pixel(tmp_path, monkeypatch):
    """Three real frames exported the way CVAT writes masks (one uncompressed RLE per class and image); pixels
    no annotation covers (CamVid's unlabelled, 11) are background."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    frames = sorted((CAMVID / "train" / "images").glob("*.png"))[:3]
    images, annotations = [], []
    (tmp_path / "images" / "train").mkdir(parents=True)
    for i, frame in enumerate(frames, 1):
        mask = np.asarray(Image.open(CAMVID / "train" / "masks" / frame.name))
        shutil.copy(frame, tmp_path / "images" / "train")
        images.append({"id": i, "file_name": frame.name, "height": mask.shape[0], "width": mask.shape[1]})
        for c in np.unique(mask[mask < 11]).tolist():
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c + 1, "iscrowd": 1,
                                "segmentation": uncompressed_rle(mask == c)})
    categories = [{"id": c + 1, "name": f"camvid_{c}"} for c in range(11)]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    tree = dataset.open_tree(tmp_path)
    pairs = tree.splits["train"].pairs + tree.splits["val"].pairs
    for image, mask in pairs:
        truth = np.asarray(Image.open(CAMVID / "train" / "masks" / image.name)).astype(np.int64)
        assert np.array_equal(read_mask(mask), np.where(truth == 11, 0, truth + 1))
    assert len(pairs) == 3


def test_a_coco_file_missing_what_rasterising_needs_is_one_line(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": [{"id": 1, "name": "car"}]}))
    out = run_cli(["--data", str(tmp_path), "--check"])
    assert "instances_train.json: an entry of `images` has no width or height" in out and "Traceback" not in out


def test_cvat_masks_of_voc_labels_without_a_labelmap_read_as_voc_by_their_colours(tmp_path):
    """CVAT writes labelmap.txt only for labels that are not VOC's: then its RGB masks are in VOC's colours."""
    masks = random_masks([0, 1, 3], 3)
    root = cvat_export(tmp_path / "cvat", masks, unmasked=0)
    (root / "labelmap.txt").unlink()
    voc = np.array(VOC_FIRST_COLOURS, np.uint8)
    for i, mask in enumerate(masks):  # repainted in VOC's colours, as CVAT paints VOC's labels
        Image.fromarray(voc[mask]).save(root / "SegmentationClass" / f"frame_{i:06d}.png")
    train = build_dataset(root, "auto", "train", PLAIN)
    val = build_dataset(root, "auto", "val", PLAIN, train.class_map)
    assert train.about[0].startswith("layout voc: the VOC table") and train.class_map.encoding == "colour"
    pixels = sum(split_statistics(ds.pairs, train.class_map).pixels for ds in (train, val))
    assert pixels[[0, 1, 3]].tolist() == counts_of(masks, [0, 1, 3]) and pixels.sum() == 3 * 12 * 16



# ---- exports of shapes: yolo, labelme json, cvat xml, via, label studio ----------------------------------------------

SHAPE = (16, 16)  # H, W: cell corners are whole numbers and normalised ones exact in binary
NAMES = ["car", "road", "tree"]


def cell_masks(n: int, seed: int = 0, cell: int = 4) -> list[tuple[np.ndarray, list[tuple[int, int, int, int, int]]]]:
    """A folder dataset's masks made of square cells, each of class 0 (background) to 3, and each mask's cells
    as (class, x0, y0, x1, y1), x1 and y1 past the cell: what every writer below turns into its tool's shapes."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        mask, cells = np.zeros(SHAPE, np.uint8), []
        for y0 in range(0, SHAPE[0], cell):
            for x0 in range(0, SHAPE[1], cell):
                c = int(rng.integers(0, 4))
                mask[y0:y0 + cell, x0:x0 + cell] = c
                cells += [(c, x0, y0, x0 + cell, y0 + cell)] if c else []
        out.append((mask, cells))
    return out


def yolo_export(root: Path, tool: str, data: list) -> list[np.ndarray]:
    """YOLO segmentation labels as Ultralytics (data.yaml, names by id, images/train), Roboflow's "YOLOv8" export
    (train/images, ../train/images in data.yaml) or Label Studio (classes.txt, images/, labels/) write them: a
    cell's polygon runs through the centres of its corner pixels, as Ultralytics' polygon2mask fills it."""
    h, w = SHAPE
    splits = {"train": data[:4], "val": data[4:]} if tool != "label-studio" else {"train": data}
    for split, items in splits.items():
        folder = {"ultralytics": root / "images" / split, "roboflow": root / ("valid" if split == "val" else split)
                  / "images", "label-studio": root / "images"}[tool]
        for i, (_, cells) in enumerate(items):
            save_rgb(folder / f"{split}_{i}.jpg", SHAPE, i)
            lines = [f"{c - 1} " + " ".join(f"{v:.6f}" for v in (x0 / w, y0 / h, x1 / w, y0 / h, x1 / w, y1 / h,
                                                                  x0 / w, y1 / h))
                     for c, x0, y0, x1, y1 in ((c, x0, y0, x1 - 1, y1 - 1) for c, x0, y0, x1, y1 in cells)]
            label = annotations.yolo_label_path(folder / f"{split}_{i}.jpg")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("\n".join(lines) + "\n")
    if tool == "ultralytics":
        (root / "data.yaml").write_text("path: ../datasets/cells\ntrain: images/train\nval: images/val\nnames:\n"
                                        + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    elif tool == "roboflow":
        (root / "data.yaml").write_text(f"train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
                                        f"nc: 3\nnames: {NAMES}\n\nroboflow:\n  workspace: w\n  version: 1\n")
    else:
        (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
        categories = [{"id": i, "name": n} for i, n in enumerate(NAMES)]
        (root / "notes.json").write_text(json.dumps({"categories": categories, "info": {"year": 2026}}))
    return [m for m, _ in data]


def labelme_export(root: Path, data: list) -> list[np.ndarray]:
    """LabelMe's own files beside the images, labels.txt as labelme's examples keep it; rectangles (two corners,
    both inside), polygons and one brush mask; one file carries its image as imageData only."""
    (root / "labels.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("__ignore__\n_background_\n" + "\n".join(NAMES) + "\n")
    for i, (_, cells) in enumerate(data):
        save_rgb(root / f"{i}.jpg", SHAPE, i)
        shapes = []
        for n, (c, x0, y0, x1, y1) in enumerate(cells):
            shape = {"label": NAMES[c - 1], "points": [[x0, y0], [x1 - 1, y1 - 1]], "group_id": None,
                     "description": "", "shape_type": "rectangle", "flags": {}, "mask": None}
            if n == 0:
                bits = io.BytesIO()
                Image.fromarray(np.ones((y1 - y0, x1 - x0), bool)).save(bits, "PNG")
                shape |= {"shape_type": "mask", "mask": base64.b64encode(bits.getvalue()).decode()}
            shapes.append(shape)
        document = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": f"{i}.jpg", "imageData": None,
                    "imageHeight": SHAPE[0], "imageWidth": SHAPE[1]}
        if i == 0:
            embedded = base64.b64encode((root / "0.jpg").read_bytes()).decode()
            document |= {"imagePath": "gone/0.jpg", "imageData": embedded}
            (root / "0.jpg").rename(root / "not_this_one.bin")
        (root / f"{i}.json").write_text(json.dumps(document, indent=2))
    return [m for m, _ in data]


def cvat_rle(bits: np.ndarray) -> str:
    """CVAT's mask RLE by hand: run lengths over the box row by row, the first run of 0s."""
    flat = bits.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ", ".join(map(str, ([0] + runs) if flat[0] else runs))


def cvat_xml_export(root: Path, data: list) -> list[np.ndarray]:
    """CVAT for images 1.1 with images: <labels> with colours, polygons and <mask>s, subsets Train and
    Validation, a box on every image (skipped), a larger polygon drawn first under the cells (z_order -1)."""
    labels = "".join(f"<label><name>{n}</name><color>#{i * 40:02x}8000</color><type>any</type><attributes/></label>"
                     for i, n in enumerate(["sky", *NAMES]))  # sky: a label no shape uses
    body = []
    for i, (mask, cells) in enumerate(data):
        subset = "Train" if i < 4 else "Validation"
        save_rgb(root / "images" / subset / f"{i}.png", SHAPE, i)
        shapes = ['<polygon label="road" source="manual" occluded="0" points="0,0;16,0;16,16;0,16" z_order="-1">'
                  '</polygon>'] if mask.min() > 0 else []  # wholly under the cells: changes nothing
        for n, (c, x0, y0, x1, y1) in enumerate(cells):
            if n % 2:
                rle = cvat_rle(np.ones((y1 - y0, x1 - x0), bool))
                shapes.append(f'<mask label="{NAMES[c - 1]}" source="manual" occluded="0" rle="{rle}" left="{x0}" '
                              f'top="{y0}" width="{x1 - x0}" height="{y1 - y0}" z_order="0"></mask>')
            else:
                points = ";".join(f"{x:.2f},{y:.2f}" for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
                shapes.append(f'<polygon label="{NAMES[c - 1]}" source="manual" occluded="0" points="{points}" '
                              'z_order="0"></polygon>')
        shapes.append('<box label="car" source="manual" occluded="0" xtl="1" ytl="1" xbr="3" ybr="3" z_order="0">'
                      "</box>")
        body.append(f'<image id="{i}" name="{i}.png" subset="{subset}" task_id="1" width="16" height="16">'
                    + "".join(shapes) + "</image>")
    (root / "annotations.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version><meta><task><id>1</id><name>t'
        f"</name><labels>{labels}</labels></task></meta>" + "".join(body) + "</annotations>")
    return [m for m, _ in data]


def via_export(root: Path, data: list, project: bool = False) -> list[np.ndarray]:
    """VIA 1's via_region_data.json in train/ and val/ beside the images (as the balloon dataset ships), or VIA 2's
    project file whose class attribute's options set the class order (tree, car, road)."""
    splits = {"train": data[:4], "val": data[4:]}
    for split, items in splits.items():
        folder, entries = root / split if not project else root, {}
        for i, (_, cells) in enumerate(items):
            save_rgb(folder / f"{split}_{i}.jpg", SHAPE, i)
            regions = [{"shape_attributes": {"name": "rect", "x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0},
                        "region_attributes": {"name" if not project else "class": NAMES[c - 1]}}
                       for c, x0, y0, x1, y1 in cells]
            size = (folder / f"{split}_{i}.jpg").stat().st_size
            entries[f"{split}_{i}.jpg{size}"] = {"fileref": "", "size": size, "filename": f"{split}_{i}.jpg",
                                                 "base64_img_data": "", "file_attributes": {},
                                                 "regions": regions if project else dict(enumerate(regions))}
        if not project:
            (folder / "via_region_data.json").write_text(json.dumps(entries))
        else:
            old = json.loads((root / "via_project.json").read_text())["_via_img_metadata"] if split == "val" else {}
            options = {"tree": "", "car": "", "road": ""}
            (root / "via_project.json").write_text(json.dumps({
                "_via_settings": {}, "_via_img_metadata": old | entries, "_via_image_id_list": list(old | entries),
                "_via_attributes": {"region": {"class": {"type": "dropdown", "options": options}}, "file": {}}}))
    return [m for m, _ in data]


def brush_rle(bits: np.ndarray) -> list[int]:
    """Label Studio's brush RLE by hand, every run a repeated value: 32 bits of length, word size 8 (stored 7),
    four run-length sizes of 16 bits (stored 15), then per run: 1, size choice 0, length - 1, the byte."""
    flat = np.repeat(bits.ravel().astype(np.uint8) * 255, 4)  # RGBA, every channel the mask's
    stream = f"{flat.size:032b}{7:05b}" + f"{15:04b}" * 4
    at = 0
    while at < flat.size:
        end = at + 1
        while end < flat.size and flat[end] == flat[at] and end - at < 2**16:
            end += 1
        stream += f"1{0:02b}{end - at - 1:016b}{int(flat[at]):08b}"
        at = end
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)]


def label_studio_export(root: Path, data: list) -> list[np.ndarray]:
    """Label Studio's JSON export: polygons in percent and brush masks, images uploaded (their names prefixed)."""
    h, w = SHAPE
    tasks = []
    for i, (_, cells) in enumerate(data):
        save_rgb(root / "images" / f"frame_{i}.png", SHAPE, i)
        results = []
        for n, (c, x0, y0, x1, y1) in enumerate(cells):
            common = {"original_width": w, "original_height": h, "image_rotation": 0, "from_name": "tag",
                      "to_name": "image", "id": f"r{n}"}
            if n % 2:
                bits = np.zeros(SHAPE, bool)
                bits[y0:y1, x0:x1] = True
                results.append(common | {"type": "brushlabels", "value": {"format": "rle", "rle": brush_rle(bits),
                                                                          "brushlabels": [NAMES[c - 1]]}})
            else:
                points = [[x * 100 / w, y * 100 / h] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
                results.append(common | {"type": "polygonlabels", "value": {"points": points, "closed": True,
                                                                            "polygonlabels": [NAMES[c - 1]]}})
        tasks.append({"id": i + 1, "data": {"image": f"/data/upload/1/{i:08x}-frame_{i}.png"},
                      "annotations": [{"id": i + 1, "result": results, "was_cancelled": False}], "predictions": []})
    (root / "result.json").write_text(json.dumps(tasks))
    return [m for m, _ in data]


def in_first_use_order(masks: list[np.ndarray], data: list) -> list[np.ndarray]:
    """The masks with classes renumbered in the order the cells first use them (VIA's and Label Studio's order)."""
    order = list(dict.fromkeys(c for _, cells in data for c, *_ in cells))
    return [np.select([m == c for c in order], range(1, len(order) + 1), 0).astype(np.uint8) for m in masks]


SHAPE_EXPORTS = {  # as EXPORTS: each returns the class-index masks the tool's classes make of its cells
    "yolo": lambda root: yolo_export(root, "roboflow", cell_masks(6)),
    "labelme-json": lambda root: labelme_export(root, cell_masks(6)),
    "cvat-xml": lambda root: [np.where(m > 0, m + 1, 0) for m in cvat_xml_export(root, cell_masks(6))],  # sky 1
    "via": lambda root: in_first_use_order(via_export(root, cell_masks(6)), cell_masks(6)),
    "label-studio": lambda root: in_first_use_order(label_studio_export(root, cell_masks(6)), cell_masks(6)),
}
EXPORTS.update(SHAPE_EXPORTS)


def read_all(root: Path) -> tuple[dataset.SegmentationDataset, dict[str, np.ndarray]]:
    """The training split's dataset and every split's masks by image name, as the loader reads them."""
    tree = dataset.open_tree(root)
    train = dataset.split_dataset(tree, "train", PLAIN)
    masks = {}
    for split in tree.splits:
        ds = dataset.split_dataset(tree, split, PLAIN, train.class_map) if tree.splits[split].pairs else None
        masks.update({image.name: ds[i][1].numpy() for i, (image, _) in enumerate(ds.pairs)} if ds else {})
    return train, masks


@pytest.mark.parametrize("tool", ["ultralytics", "roboflow", "label-studio"])
def test_yolo_polygons_read_back_exactly_with_names_splits_and_background(tmp_path, tool, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = cell_masks(6)
    written = yolo_export(tmp_path / "export", tool, data)
    train, masks = read_all(tmp_path / "export")
    assert train.class_map.names == ("background", *NAMES) and train.about[0].startswith("layout yolo: ")
    names = [f"{s}_{i}.jpg" for s, n in (("train", 4), ("val", 2)) for i in range(n)] if tool != "label-studio" else [
        f"train_{i}.jpg" for i in range(6)]
    assert sorted(masks) == sorted(names)
    for name, mask in zip(names, written):
        assert np.array_equal(masks[name], mask), name


def test_yolo_boxes_are_counted_an_empty_file_is_background_and_boxes_only_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "export"
    yolo_export(root, "ultralytics", cell_masks(6))
    (root / "labels" / "train" / "train_0.txt").write_text("")  # Ultralytics' background image
    with (root / "labels" / "train" / "train_1.txt").open("a") as f:
        f.write("0 0.5 0.5 0.25 0.25\n")
    (root / "labels" / "train" / "train_2.txt").unlink()
    train, masks = read_all(root)
    text = "\n".join(train.about)
    assert not masks["train_0.jpg"].any() and "1 images have an empty label file: read as background only" in text
    assert "1 labels are boxes (no polygon): skipped" in text and "1 images have no label file: skipped" in text
    for label in (root / "labels").rglob("*.txt"):
        label.write_text("1 0.5 0.5 0.25 0.25\n")
    message = run_cli(["--data", str(root), "--check"])
    assert "boxes only" in message and "needs polygons or masks" in message


def test_labelme_files_read_back_exactly_in_labels_txt_order_with_imagedata_and_ignore(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = cell_masks(4)
    written = labelme_export(tmp_path / "export", data)
    shapes = json.loads((tmp_path / "export" / "3.json").read_text())
    shapes["shapes"][-1]["label"] = "__ignore__"
    (tmp_path / "export" / "3.json").write_text(json.dumps(shapes))
    c, x0, y0, x1, y1 = data[3][1][-1]
    written[3][y0:y1, x0:x1] = 255
    tree = dataset.open_tree(tmp_path / "export")
    assert tree.layout == "labelme-json" and tree.table.names == ("_background_", *NAMES)
    class_map = dataset.split_dataset(tree, "train", PLAIN).class_map
    pairs = sorted((p for f in tree.splits.values() for p in f.pairs), key=lambda p: p[1].name)  # 0.json, 1.json..
    assert len(pairs) == 4 and pairs[0][0].parent.name == "embedded"  # 0.json's image is its imageData
    assert [image.stem for image, _ in pairs[1:]] == ["1", "2", "3"]
    for (_, mask_path), expected in zip(pairs, written):
        assert np.array_equal(class_map.apply(read_mask(mask_path))[0], expected)


def test_labelme_shapes_are_drawn_as_labelme_draws_them(tmp_path, monkeypatch):
    """labelme2voc.py's shape_to_mask: Pillow, outline and fill, lines 10 wide, points discs of radius 5."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save_rgb(tmp_path / "a.jpg", (40, 48))
    polygon, (cx, cy, r) = [[4.5, 3.2], [30.0, 6.0], [22.0, 30.7], [6.0, 20.0]], (36.0, 26.0, 8.5)
    shapes = [{"label": "road", "points": polygon, "shape_type": "polygon"},
              {"label": "car", "points": [[cx, cy], [cx + r, cy]], "shape_type": "circle"},
              {"label": "sign", "points": [[40, 2], [44.5, 9]], "shape_type": "rectangle"},
              {"label": "pole", "points": [[2, 36], [20, 30], [30, 38]], "shape_type": "linestrip"},
              {"label": "dot", "points": [[12, 12]], "shape_type": "point"}]
    (tmp_path / "a.json").write_text(json.dumps({"version": "5.5.0", "shapes": shapes, "imagePath": "a.jpg",
                                                 "imageData": None, "imageHeight": 40, "imageWidth": 48}))
    tree = dataset.open_tree(tmp_path)
    theirs = Image.new("L", (48, 40))
    draw = ImageDraw.Draw(theirs)
    draw.polygon([tuple(p) for p in polygon], fill=1, outline=1)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=2, outline=2)
    draw.rectangle([40, 2, 44.5, 9], fill=3, outline=3)
    draw.line([(2, 36), (20, 30), (30, 38)], fill=4, width=10, joint="curve")
    draw.ellipse([7, 7, 17, 17], fill=5, outline=5)
    assert tree.table.names == ("background", "road", "car", "sign", "pole", "dot")
    assert np.array_equal(read_mask(tree.splits["train"].pairs[0][1]), np.asarray(theirs))


def test_cvat_xml_reads_labels_in_order_rle_masks_polygons_and_counts_boxes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "export"
    written = cvat_xml_export(root, cell_masks(6))
    xml = (root / "annotations.xml").read_text()
    xml = xml.replace("</annotations>", '<image id="9" name="9.png" subset="Train" width="16" height="16">'
                      "</image></annotations>")
    (root / "annotations.xml").write_text(xml)
    save_rgb(root / "images" / "Train" / "9.png", SHAPE)
    train, masks = read_all(root)
    assert train.class_map.names == ("background", "sky", *NAMES)
    for i, mask in enumerate(written):  # classes 1..3 of the cells are 2..4 here, after sky
        assert np.array_equal(masks[f"{i}.png"], np.where(mask > 0, mask + 1, 0)), i
    text = "\n".join(train.about)
    assert "6 shapes <box> (no area): skipped" in text and "1 images have no annotation: skipped" in text
    assert train.about[0] == "layout cvat-xml: annotations.xml with 4 labels, splits Train (4) and Validation (2)"
    status, lines = check(["--data", str(root)], capsys)
    assert status == 0 and any("never present" in line and "sky" in line for line in lines)


def test_cvat_xml_finds_its_images_by_name_below_the_export_and_counts_the_absent(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "export"
    written = cvat_xml_export(root, cell_masks(6))
    for i in (0, 1):  # the images a user keeps in a folder of their own: images/raw/ below the XML
        (root / "images" / "raw").mkdir(exist_ok=True)
        (root / "images" / "Train" / f"{i}.png").rename(root / "images" / "raw" / f"{i}.png")
    for i in (2, 3):
        (root / "images" / "Train" / f"{i}.png").unlink()
    train, masks = read_all(root)
    assert sorted(image.name for image, _ in train.pairs) == ["0.png", "1.png"]
    assert all(image.parent == root / "images" / "raw" for image, _ in train.pairs)
    for i in (0, 1):
        assert np.array_equal(masks[f"{i}.png"], np.where(written[i] > 0, written[i] + 1, 0))
    assert "warning: split Train: 2 annotated images are not there, their annotations unused: 2.png, 3.png" in (
        train.about)
    status, _ = check(["--data", str(root)], capsys)
    assert status == 0


def test_cvat_xml_paints_by_z_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save_rgb(tmp_path / "images" / "a.png", (8, 8))
    shapes = ('<polygon label="top" points="0,0;8,0;8,8;0,8" z_order="2"/>'
              '<polygon label="under" points="0,0;8,0;8,8;0,8" z_order="1"/>'
              '<polygon label="under" points="0,0;4,0;4,4;0,4" z_order="3"/>')
    (tmp_path / "annotations.xml").write_text(
        "<annotations><meta><task><labels><label><name>under</name></label><label><name>top</name></label>"
        "<label><name>hand</name><type>skeleton</type></label>"  # a skeleton and its points are no classes
        "<label><name>1</name><type>points</type><parent>hand</parent></label>"
        f'</labels></task></meta><image id="0" name="a.png" width="8" height="8">{shapes}</image></annotations>')
    tree = dataset.open_tree(tmp_path)
    assert tree.table.names == ("background", "under", "top")
    mask = read_mask(tree.splits["default"].pairs[0][1])
    assert (mask[:4, :4] == 1).all() and (mask == 2).sum() == 64 - 16


@pytest.mark.parametrize("project", [False, True])
def test_via_regions_read_back_exactly_classes_from_the_attribute(tmp_path, project, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    written = via_export(tmp_path / "export", cell_masks(6), project)
    train, masks = read_all(tmp_path / "export")
    order = ["tree", "car", "road"] if project else None
    if project:  # the project's options give the order; one split of six images
        assert train.class_map.names == ("background", *order) and len(masks) == 6
        written = [np.select([m == 1, m == 2, m == 3], [2, 3, 1], 0) for m in written]
    else:
        assert train.class_map.names[0] == "background" and set(train.class_map.names[1:]) == set(NAMES)
        written = [np.select([m == c for c in (1, 2, 3)], [train.class_map.names.index(n) for n in NAMES], 0)
                   for m in written]
        assert train.about[0].startswith("layout via: 3 classes of region attribute 'name', splits train (4) and val")
    names = [f"{s}_{i}.jpg" for s, n in (("train", 4), ("val", 2)) for i in range(n)]
    for name, mask in zip(names, written):
        assert np.array_equal(masks[name], mask), name


def test_via_regions_without_a_class_are_counted_and_no_attribute_at_all_is_one_class(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "export"
    via_export(root, cell_masks(6))
    path = root / "train" / "via_region_data.json"
    entries = json.loads(path.read_text())
    first = next(iter(entries.values()))
    first["regions"]["0"]["region_attributes"] = {}
    path.write_text(json.dumps(entries))
    train, _ = read_all(root)
    assert "1 regions with no 'name' attribute (no class): skipped" in "\n".join(train.about)
    for split in ("train", "val"):
        path = root / split / "via_region_data.json"
        entries = json.loads(path.read_text())
        for entry in entries.values():
            for region in entry["regions"].values():
                region["region_attributes"] = {}
        path.write_text(json.dumps(entries))
    train, masks = read_all(root)
    assert train.class_map.names == ("background", "object") and "one class" in train.about[0]


def test_label_studio_json_decodes_brush_rle_and_polygons_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = cell_masks(3)
    written = label_studio_export(tmp_path / "export", data)
    train, masks = read_all(tmp_path / "export")
    order = list(dict.fromkeys(NAMES[c - 1] for _, cells in data for c, *_ in cells))
    assert train.class_map.names == ("background", *order)
    for i, mask in enumerate(written):
        expected = np.select([mask == c for c in (1, 2, 3)], [order.index(n) + 1 for n in NAMES], 0)
        assert np.array_equal(masks[f"frame_{i}.png"], expected), i


@pytest.mark.parametrize("layout", EXPORTS)
def test_a_zip_of_each_export_reads_as_the_folder_does(tmp_path, layout, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    EXPORTS[layout](tmp_path / "export")
    folder = dataset.open_tree(tmp_path / "export")
    zipped = dataset.open_tree(zip_folder(tmp_path / "export", tmp_path / "export.zip"))
    assert zipped.layout == folder.layout and zipped.table.names == folder.table.names
    assert {s: len(f.pairs) for s, f in zipped.splits.items()} == {s: len(f.pairs) for s, f in folder.splits.items()}


# ---- what exports get wrong, each said in one line -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16])
def test_a_voc_style_tree_of_non_voc_masks_reads_numbered_classes_and_says_how_to_name_them(tmp_path, bits):
    """labelme2voc's tree without its class file, masks of grey ids (or 16-bit): not VOC's 21 names."""
    masks = random_masks([0, 1, 2], 4)
    for i, mask in enumerate(masks):
        save_rgb(tmp_path / "JPEGImages" / f"{i}.jpg", mask.shape, i)
        (tmp_path / "SegmentationClass").mkdir(exist_ok=True)
        Image.fromarray(mask.astype(np.uint16 if bits == 16 else np.uint8)).save(
            tmp_path / "SegmentationClass" / f"{i}.png")
    tree = dataset.open_tree(tmp_path)
    assert tree.table.names == ("class_0", "class_1", "class_2")
    note = next(n for n in tree.notes if "numbered classes" in n)
    assert "not VOC's" in note and "--classes FILE" in note and "\n" not in note
    class_map = dataset.split_dataset(tree, "train", PLAIN).class_map
    pairs = [p for f in tree.splits.values() for p in f.pairs]
    assert split_statistics(pairs, class_map).pixels.tolist() == counts_of(masks, [0, 1, 2])


def test_an_old_labelme2voc_tree_without_its_class_file_reads_numbered_classes_not_vocs(tmp_path, capsys):
    """labelme2voc.py before 4.0: SegmentationClassPNG/ (palette PNGs in VOC's colours), SegmentationClass/*.npy,
    SegmentationClassVisualization/, and no class_names.txt: labels of its own, not VOC's aeroplane, bicycle, ..."""
    masks = random_masks([0, 1, 3, 255], 3)
    for i, mask in enumerate(masks):
        save_rgb(tmp_path / "JPEGImages" / f"{i}.jpg", mask.shape, i)
        save_palette_mask(tmp_path / "SegmentationClassPNG" / f"{i}.png", mask)
        (tmp_path / "SegmentationClass").mkdir(exist_ok=True)
        np.save(tmp_path / "SegmentationClass" / f"{i}.npy", mask.astype(np.int32))
        save_rgb(tmp_path / "SegmentationClassVisualization" / f"{i}.jpg", mask.shape, i)
    tree = dataset.open_tree(tmp_path)
    assert tree.layout == "labelme" and tree.table.names == ("class_0", "class_1", "class_2", "class_3")
    note = next(n for n in tree.notes if "numbered classes" in n)
    assert "labelme2voc.py's tree without its class_names.txt" in note and "--write-classes" in note
    class_map = dataset.split_dataset(tree, "train", PLAIN).class_map
    stats = split_statistics([p for f in tree.splits.values() for p in f.pairs], class_map)  # val is held out
    assert stats.pixels.tolist() == counts_of(masks, [0, 1, 2, 3]) and stats.ignored == counts_of(masks, [255])[0]
    status, lines = check(["--data", str(tmp_path)], capsys)
    assert status == 0 and any("labelme2voc.py's tree" in line for line in lines)


def test_voc_palette_masks_still_read_with_voc_names(tmp_path):
    masks = dict(zip("abc", random_masks([0, 1, 2], 3)))
    voc_tree(tmp_path, masks, {"train": ["a", "b"], "val": ["c"]})
    assert dataset.open_tree(tmp_path).table.names[:3] == ("background", "aeroplane", "bicycle")


def test_trainval_that_is_not_train_plus_val_is_a_split_of_its_own(tmp_path, capsys):
    masks = dict(zip("abcdef", random_masks([0, 1, 15], 6)))
    voc_tree(tmp_path, masks, {"train": list("abcd"), "val": ["e", "f"], "trainval": ["c", "d"]})
    tree = dataset.open_tree(tmp_path)
    assert "trainval" not in tree.unions and any("trainval.txt is not train + val" in n for n in tree.notes)
    status, lines = check(["--data", str(tmp_path)], capsys)
    assert any(line.startswith("    class") and "trainval pixels" in line for line in lines)
    voc_tree(tmp_path, masks, {"train": list("abcd"), "val": ["e", "f"], "trainval": list("abcdef")})
    assert dataset.open_tree(tmp_path).unions == {"trainval"}
    _, lines = check(["--data", str(tmp_path)], capsys)
    assert not any("trainval pixels" in line for line in lines)


def test_masks_broken_by_a_line_ending_conversion_are_one_line_per_split(tmp_path, capsys):
    for split in ("train", "valid"):
        roboflow_split(tmp_path / split, random_masks([0, 1, 2], 3))
        for mask in (tmp_path / split).glob("*_mask.png"):
            mask.write_bytes(mask.read_bytes().replace(b"\n", b"\r\n"))  # what a text-mode copy does
    status, lines = check(["--data", str(tmp_path)], capsys)
    broken = [line for line in lines if "cannot be read" in line]
    assert status == 1 and len(broken) == 2 and all("3 masks of split" in line for line in broken)
    assert all("line-ending" in line and "copy the export again as binary" in line for line in broken)


def test_a_coco_file_of_boxes_only_is_one_line(tmp_path):
    save_rgb(tmp_path / "images" / "a.jpg", (12, 16))
    (tmp_path / "result.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "images/a.jpg", "width": 16, "height": 12}],
        "categories": [{"id": 0, "name": "car"}],
        "annotations": [{"id": 0, "image_id": 0, "category_id": 0, "bbox": [1, 1, 4, 4], "segmentation": [],
                         "area": 16, "iscrowd": 0}]}))
    message = run_cli(["--data", str(tmp_path), "--check"])
    assert "result.json" in message and "boxes only" in message and "needs polygons or masks" in message


def test_coco_overlaps_are_counted_over_the_images_that_are_there(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, _ = coco_export(tmp_path / "export", "cvat")
    data = json.loads((root / "annotations" / "instances_default.json").read_text())
    overlapping = [{**a, "id": 200 + a["id"], "image_id": 4} for a in data["annotations"] if a["image_id"] == 1]
    data["annotations"] += overlapping  # gone.jpg (id 4), which is not there, overlaps as a.jpg does
    (root / "annotations" / "instances_default.json").write_text(json.dumps(data))
    text = "\n".join(dataset.open_tree(root).findings)
    assert "overlap on 4 pixels in 1 images" in text and "1 annotated images are not there" in text


def test_a_dataset_a_few_folders_down_is_found_and_several_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    labelme_export(tmp_path / "examples" / "semantic_segmentation" / "data_annotated", cell_masks(3))
    tree = dataset.open_tree(tmp_path)
    assert tree.layout == "labelme-json" and tree.root.name == "data_annotated"
    assert any("holds one dataset" in n and "data_annotated" in n for n in tree.notes)
    via_export(tmp_path / "examples" / "balloon", cell_masks(6))
    message = run_cli(["--data", str(tmp_path), "--check"])
    assert "holds 2 datasets" in message and "balloon" in message and "data_annotated" in message
    assert "pass one of them as --data" in message


def test_a_labelme_file_with_no_shapes_is_said(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    labelme_export(tmp_path, cell_masks(4))
    document = json.loads((tmp_path / "2.json").read_text())
    (tmp_path / "2.json").write_text(json.dumps(document | {"shapes": []}))
    tree = dataset.open_tree(tmp_path)
    assert any("1 images have no annotation: skipped" in f and "2.json" in f for f in tree.findings)


MALFORMED = {  # an export that its tool would never write, and the file the one line must name
    "via": ("via_region_data.json", {"a.jpg1": {"filename": "a.jpg", "regions": [{"shape_attributes": {
        "name": "rect", "x": "left"}, "region_attributes": {"class": "car"}}]}}),
    "label-studio": ("result.json", [{"data": {"image": "a.jpg"}, "annotations": ["not a dict"]}]),
    "coco": ("result.json", {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
                             "categories": [{"id": 1, "name": "car"}],
                             "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                              "segmentation": [["x", "y", "x", "y", "x", "y"]]}]}),
    "labelme-json": ("a.json", {"version": "5.5.0", "shapes": [{"label": "car", "points": [[0, 0], [1, 2, 3]],
                                                                 "shape_type": "polygon"}], "imagePath": "a.jpg"}),
    "cvat-xml": ("annotations.xml", '<annotations><meta><task><labels><label><name>car</name></label></labels>'
                 '</task></meta><image name="a.jpg" width="8" height="eight">'
                 '<polygon label="car" points="0,0;4,0;4,4"/></image></annotations>'),
}


@pytest.mark.parametrize("layout", MALFORMED)
def test_a_malformed_export_is_one_line_naming_its_file(tmp_path, layout, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    name, content = MALFORMED[layout]
    save_rgb(tmp_path / "export" / "a.jpg", (8, 8))
    save_rgb(tmp_path / "export" / "images" / "a.jpg", (8, 8))
    (tmp_path / "export" / name).write_text(content if isinstance(content, str) else json.dumps(content))
    message = run_cli(["--data", str(tmp_path / "export"), "--check"])
    assert name in message or "a.jpg" in message


# ---- writers: a model's masks as each tool imports them ----


def flood_fill_regions(bits: np.ndarray) -> list[set]:
    """The 8-connected regions of a mask, by a breadth-first flood fill: the independent reference."""
    seen, regions = np.zeros_like(bits), []
    for y, x in zip(*np.nonzero(bits)):
        if seen[y, x]:
            continue
        region, todo = set(), [(y, x)]
        seen[y, x] = True
        while todo:
            cy, cx = todo.pop()
            region.add((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < bits.shape[0] and 0 <= nx < bits.shape[1] and bits[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        todo.append((ny, nx))
        regions.append(frozenset(region))
    return regions


@pytest.mark.parametrize("seed", range(4))
def test_connected_regions_are_those_of_a_flood_fill(seed):
    from annotations import connected_regions

    bits = np.random.default_rng(seed).random((23, 31)) < (0.3 + 0.1 * seed)
    labels, n = connected_regions(bits)
    ours = [frozenset(zip(*np.nonzero(labels == k))) for k in range(1, n + 1)]
    assert set(ours) == set(flood_fill_regions(bits)) and len(ours) == n
    assert ((labels > 0) == bits).all()


@pytest.mark.parametrize("shape", [(23, 31), (5, 1), (1, 9)])
def test_region_rles_are_pycocotools_encoding_of_each_region(shape):
    from pycocotools import mask as mask_utils

    from annotations import connected_regions, region_rles

    labels, n = connected_regions(np.random.default_rng(0).random(shape) < 0.5)
    for k, counts in enumerate(region_rles(labels, n), 1):
        ours = mask_utils.frPyObjects({"counts": counts, "size": list(shape)}, *shape)["counts"]
        assert ours == mask_utils.encode(np.asfortranarray((labels == k).astype(np.uint8)))["counts"]


def test_brush_rle_of_a_mask_decodes_back_and_declares_its_size():
    from annotations import decode_brush_rle, encode_brush_rle

    rng = np.random.default_rng(0)
    for bits in (rng.random((37, 53)) < 0.5, np.ones((300, 400), bool), np.zeros((5, 7), bool)):
        rle = encode_brush_rle(bits)  # the 300x400 mask is one run of 480,000 bytes: split into runs of 2^16
        assert int.from_bytes(bytes(rle[:4]), "big") == bits.size * 4
        assert np.array_equal(decode_brush_rle(rle, *bits.shape), bits)


# ---- bad COCO files: refused in one line before anything is rasterised ----


def small_coco(root: Path, mutate: Callable[[dict], None] = lambda document: None) -> Path:
    """Label Studio's COCO layout: one 12x16 image with a car rectangle and a road rectangle, changed by `mutate`."""
    save_rgb(root / "images" / "a.jpg", (12, 16))
    save_rgb(root / "images" / "b.jpg", (12, 16), 1)
    document = {"images": [{"id": 1, "file_name": "images/a.jpg", "width": 16, "height": 12},
                           {"id": 2, "file_name": "images/b.jpg", "width": 16, "height": 12}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rectangle(0, 0, 8, 6)},
                                {"id": 2, "image_id": 2, "category_id": 2, "segmentation": rectangle(4, 4, 16, 12)}],
                "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "road"}]}
    mutate(document)
    (root / "result.json").write_text(json.dumps(document))
    return root


def set_in(path: tuple, value: object) -> Callable[[dict], None]:
    def mutate(document: dict) -> None:
        *parents, last = path
        target = document
        for key in parents:
            target = target[key]
        target[last] = value
    return mutate


BAD_COCO = {
    "two categories of one id": (set_in(("categories", 1, "id"), 1), "two categories have the id 1"),
    "two images of one id": (set_in(("images", 1, "id"), 1), "two images have the id 1"),
    "a width that is a string": (set_in(("images", 0, "width"), "16"), "image 1 has width 16 and height 12"),
    "a declared size not the file's": (set_in(("images", 0, "width"), 30000),
                                        "declares 30000x12 pixels, but"),
    "a polygon of strings": (set_in(("annotations", 0, "segmentation"), [["a", "b", "c", "d", "e", "f"]]),
                             "annotation 1 has a polygon that is no list of x, y numbers"),
    "a polygon with a NaN": (set_in(("annotations", 0, "segmentation"), [[0, 0, 4, 0, 4, float("nan")]]),
                             "annotation 1 has a polygon"),
    "garbage RLE counts": (set_in(("annotations", 0, "segmentation"), {"size": [12, 16], "counts": "zz}~garbage"}),
                           "annotation 1 has RLE counts that are no mask of 12x16 pixels"),
    "RLE runs past the image": (set_in(("annotations", 0, "segmentation"), {"size": [12, 16], "counts": [100000]}),
                                "annotation 1 has RLE counts"),
    "negative RLE runs": (set_in(("annotations", 0, "segmentation"), {"size": [12, 16], "counts": [200, -8]}),
                          "annotation 1 has RLE counts"),
    "an RLE of another size": (set_in(("annotations", 0, "segmentation"), {"size": [6, 8], "counts": [48]}),
                               "is an RLE of size [6, 8], but its image is 12x16"),
}


@pytest.mark.parametrize("case", BAD_COCO)
def test_a_bad_coco_file_is_refused_in_one_line_before_rasterising(tmp_path, case, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mutate, needle = BAD_COCO[case]
    message = run_cli(["--data", str(small_coco(tmp_path / "export", mutate)), "--check"])
    assert needle in message, message
    assert not list((tmp_path / "cache").rglob("*.png"))  # nothing was rasterised


def test_a_coco_file_nested_deeper_than_python_recurses_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = small_coco(tmp_path / "export")
    deep = "[" * 200_000 + "]" * 200_000
    (root / "result.json").write_text(json.dumps(json.loads((root / "result.json").read_text()))
                                      .replace('"segmentation": [[0, 0, 8', f'"x": {deep}, "segmentation": [[0, 0, 8'))
    assert "cannot read" in run_cli(["--data", str(root), "--check"])


def test_coco_image_ids_of_any_json_type_train_and_write_nothing_outside_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    escape, absolute = "../../../../escape", str(tmp_path / "absolute")

    def ids(document: dict) -> None:
        for image, ann, new in zip(document["images"], document["annotations"], (escape, absolute)):
            image["id"] = ann["image_id"] = new

    root = small_coco(tmp_path / "export", ids)
    train = build_dataset(root, "coco", "train", PLAIN, val_fraction=0.5)
    val = build_dataset(root, "coco", "val", PLAIN, train.class_map, val_fraction=0.5)
    masks = {image.name: read_mask(mask) for image, mask in train.pairs + val.pairs}
    car, road = np.zeros((12, 16), np.uint8), np.zeros((12, 16), np.uint8)
    car[0:6, 0:8], road[4:12, 4:16] = 1, 2
    assert np.array_equal(masks["a.jpg"], car) and np.array_equal(masks["b.jpg"], road)
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - {p for p in (tmp_path / "cache").rglob("*")}
    assert written == {root / "result.json", root / "images" / "a.jpg", root / "images" / "b.jpg"}


def test_rle_string_counts_are_pycocotools_run_lengths():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 40, 2)
        bits = rng.random((h, w)) < rng.random()
        encoded = mask_utils.encode(np.asfortranarray(bits.astype(np.uint8)))["counts"].decode()
        assert annotations.rle_string_counts(encoded) == uncompressed_rle(bits)["counts"]
    assert annotations.rle_string_counts("a b") is None and annotations.rle_string_counts("o") is None


def cvat_one_shape(root: Path, shape: str, width: int = 16, height: int = 12) -> Path:
    save_rgb(root / "images" / "a.png", (12, 16))
    (root / "annotations.xml").write_text(
        '<annotations><meta><task><labels><label><name>car</name></label></labels></task></meta>'
        f'<image id="0" name="a.png" width="{width}" height="{height}">{shape}</image></annotations>')
    return root


@pytest.mark.parametrize("shape, width, needle", [
    ('<mask label="car" rle="0,10000000000" left="0" top="0" width="100000" height="100000"/>', 16,
     "a <mask> in {root}/annotations.xml, image 'a.png' has 10,000,000,000 pixels, over the limit"),
    ('<polygon label="car" points="0,0;1e12,0;1e12,1e12"/>', 16,
     "a shape has the point (1e+12, 0), over a whole image's size outside the 16x12 image"),
    ('<polygon label="car" points="0,0;8,0;8,8"/>', 30000, "the export declares 30000x12 pixels, but"),
])
def test_a_shape_or_size_that_would_rasterise_absurdly_is_one_line(tmp_path, shape, width, needle, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = cvat_one_shape(tmp_path / "export", shape, width)
    message = run_cli(["--data", str(root), "--check"])
    assert needle.format(root=root) in message, message
    assert not list((tmp_path / "cache").rglob("*.png"))


def test_a_labelme_file_declaring_another_size_than_its_image_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save_rgb(tmp_path / "export" / "a.jpg", (12, 16))
    (tmp_path / "export" / "a.json").write_text(json.dumps({
        "version": "5.5.0", "imagePath": "a.jpg", "imageHeight": 16, "imageWidth": 12, "imageData": None,
        "shapes": [{"label": "car", "points": [[0, 0], [8, 0], [8, 8]], "shape_type": "polygon"}]}))
    message = run_cli(["--data", str(tmp_path / "export"), "--check"])
    assert "image a.json: the export declares 12x16 pixels, but" in message and "a.jpg is 16x12" in message


def test_labelme_and_yolo_points_that_are_no_numbers_or_far_outside_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name, points in (("nan", "[[0, 0], [NaN, 0], [5, 5]]"), ("far", "[[0, 0], [1e12, 0], [1e12, 1e12]]")):
        root = tmp_path / f"labelme-{name}"
        save_rgb(root / "a.jpg", (12, 16))
        (root / "a.json").write_text('{"version": "5.5.0", "imagePath": "a.jpg", "imageHeight": 12, "imageWidth": 16, '
                                     f'"shapes": [{{"label": "car", "points": {points}, "shape_type": "polygon"}}]}}')
        assert "over a whole image's size outside the 16x12 image" in run_cli(["--data", str(root), "--check"])
    for name, line in (("nan", "0 0.1 0.1 nan 0.2 0.3 0.3"), ("far", "0 0.1 0.1 1e12 0.2 0.3 0.3")):
        root = tmp_path / f"yolo-{name}"
        save_rgb(root / "images" / "train" / "a.jpg", (12, 16))
        (root / "labels" / "train").mkdir(parents=True)
        (root / "labels" / "train" / "a.txt").write_text(line + "\n")
        (root / "data.yaml").write_text("names: [car]\ntrain: images/train\nval: images/train\n")
        message = run_cli(["--data", str(root), "--check"])
        assert "a.txt, line 1: coordinates not normalised to 0..1" in message, message
