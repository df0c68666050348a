"""Every export of shapes read back against PNG masks: all of CamVid written as each tool writes its export, opened
the first time (rasterised, with an empty cache) and again (cached), and each class's pixels against CamVid's own
masks (BENCHMARKS.md, "Exports of annotation tools").

    python benchmarks/exports.py [--camvid ../shared/data/camvid] [--formats coco cvat-xml ...]

Per frame and class present: one COCO RLE annotation (`coco`, as CVAT's "COCO 1.0" export of masks), one CVAT <mask>
over the class's box (`cvat-xml`), one LabelMe `mask` shape (`labelme-json`), one Label Studio brush RLE
(`label-studio`, its JSON export; label-studio-sdk's encoder where it is installed); and for the polygon formats the
outer contours of each class's regions, every boundary pixel a vertex (OpenCV's findContours: `pip install
opencv-python-headless` for these two), as YOLO lines (`yolo`, with data.yaml) and VIA polygons (`via`). CamVid's
unlabelled 11 has no shape: it is the exports' background.
"""

import argparse
import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from common import CAMVID, ROOT, machine
from PIL import Image

import dataset
from annotations import encode_brush_rle

NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist"]


def frames(camvid: Path) -> list[tuple[str, Path, np.ndarray]]:
    """(split, image, CamVid ids [H, W]) of every frame."""
    return [(split, path, dataset.read_mask(camvid / split / "masks" / path.name)) for split in ("train", "val")
            for path in sorted((camvid / split / "images").iterdir())]


def link(image: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(image.resolve(), target)


def box(bits: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(bits)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def contours(bits: np.ndarray) -> list[np.ndarray]:
    import cv2

    found, _ = cv2.findContours(bits.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c[:, 0, :] for c in found if len(c) >= 3]


# ---- each tool's export, written as the tool writes it ------------------------------------------------------------


def write_coco(root: Path, data: list) -> str:
    from pycocotools import mask as mask_utils

    for split in ("train", "val"):
        images, annotations = [], []
        for i, (_, image, ids) in enumerate((f for f in data if f[0] == split), 1):
            link(image, root / "images" / split / image.name)
            images.append({"id": i, "file_name": image.name, "height": ids.shape[0], "width": ids.shape[1]})
            for c in range(len(NAMES)):
                bits = np.asfortranarray(ids == c).astype(np.uint8)
                if bits.any():
                    rle = mask_utils.encode(bits)
                    annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c + 1,
                                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                        "iscrowd": 1, "area": int(bits.sum()),
                                        "bbox": mask_utils.toBbox(rle).tolist()})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        categories = [{"id": c + 1, "name": n, "supercategory": ""} for c, n in enumerate(NAMES)]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
    return ""


def cvat_runs(bits: np.ndarray) -> str:
    flat = bits.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ", ".join(map(str, [0] + runs if flat[0] else runs))


def write_cvat_xml(root: Path, data: list) -> str:
    labels = "".join(f"<label><name>{n}</name><color>#{c * 20:02x}8040</color><type>any</type></label>"
                     for c, n in enumerate(NAMES))
    body = []
    for i, (split, image, ids) in enumerate(data):
        subset = {"train": "Train", "val": "Validation"}[split]
        link(image, root / "images" / subset / image.name)
        shapes = []
        for c, name in enumerate(NAMES):
            if (ids == c).any():
                x0, y0, x1, y1 = box(ids == c)
                runs = cvat_runs((ids == c)[y0:y1 + 1, x0:x1 + 1])
                shapes.append(f'<mask label="{name}" source="manual" occluded="0" rle="{runs}" left="{x0}" '
                              f'top="{y0}" width="{x1 - x0 + 1}" height="{y1 - y0 + 1}" z_order="0"></mask>')
        body.append(f'<image id="{i}" name="{image.name}" subset="{subset}" width="{ids.shape[1]}" '
                    f'height="{ids.shape[0]}">{"".join(shapes)}</image>')
    (root / "annotations.xml").write_text('<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>'
                                          f"<meta><task><labels>{labels}</labels></task></meta>{''.join(body)}"
                                          "</annotations>")
    return ""


def png_base64(bits: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(bits).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_labelme(root: Path, data: list) -> str:
    for split, image, ids in data:
        link(image, root / split / image.name)
        shapes = []
        for c, name in enumerate(NAMES):
            if (ids == c).any():
                x0, y0, x1, y1 = box(ids == c)
                shapes.append({"label": name, "points": [[x0, y0], [x1, y1]], "group_id": None, "flags": {},
                               "shape_type": "mask", "mask": png_base64((ids == c)[y0:y1 + 1, x0:x1 + 1])})
        (root / split / f"{image.stem}.json").write_text(json.dumps(
            {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image.name, "imageData": None,
             "imageHeight": ids.shape[0], "imageWidth": ids.shape[1]}))
    return ""


def write_label_studio(root: Path, data: list) -> str:
    try:
        from label_studio_sdk.converter.brush import mask2rle  # label-studio-sdk's own encoder (RGBA, alpha 255)

        def encode(bits: np.ndarray) -> list[int]:
            return mask2rle(np.where(bits, 255, 0).astype(np.uint8))
        encoder = "label-studio-sdk's mask2rle"
    except ImportError:
        encode, encoder = encode_brush_rle, "annotations.encode_brush_rle (no label-studio-sdk here)"
    tasks = []
    for _, image, ids in data:
        link(image, root / "images" / image.name)
        results = [{"type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": ids.shape[1],
                    "original_height": ids.shape[0], "value": {"format": "rle", "rle": encode(ids == c),
                                                               "brushlabels": [name]}}
                   for c, name in enumerate(NAMES) if (ids == c).any()]
        tasks.append({"data": {"image": f"/data/upload/1/{image.name}"}, "annotations": [{"result": results}]})
    (root / "result.json").write_text(json.dumps(tasks))
    return encoder


def write_yolo(root: Path, data: list) -> str:
    for split, image, ids in data:
        link(image, root / split / "images" / image.name)
        h, w = ids.shape
        lines = [f"{c} " + " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in contour)
                 for c in range(len(NAMES)) for contour in contours(ids == c)]
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        (root / split / "labels" / f"{image.stem}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  - {n}\n" for n in NAMES)
    (root / "data.yaml").write_text(f"train: train/images\nval: val/images\nnc: {len(NAMES)}\nnames:\n{names}")
    return ""


def write_via(root: Path, data: list) -> str:
    for split in ("train", "val"):
        entries = {}
        for _, image, ids in (f for f in data if f[0] == split):
            link(image, root / split / image.name)
            regions = [{"shape_attributes": {"name": "polygon", "all_points_x": contour[:, 0].tolist(),
                                             "all_points_y": contour[:, 1].tolist()},
                        "region_attributes": {"class": name}}
                       for c, name in enumerate(NAMES) for contour in contours(ids == c)]
            size = (root / split / image.name).stat().st_size
            entries[f"{image.name}{size}"] = {"filename": image.name, "size": size, "regions": regions,
                                              "file_attributes": {}}
        (root / split / "via_region_data.json").write_text(json.dumps(entries))
    return ""


WRITERS = {"coco": write_coco, "cvat-xml": write_cvat_xml, "labelme-json": write_labelme,
           "label-studio": write_label_studio, "yolo": write_yolo, "via": write_via}


# ---- read back ---------------------------------------------------------------------------------------------------


def pixels_by_name(tree: dataset.DatasetTree) -> dict[str, int]:
    """Each named class's pixels over every split of an opened export (its masks as the loader reads them)."""
    counts: dict[str, int] = {}
    classes = dataset.class_map_of(tree.table, "index")  # a shape export's masks hold its table's ids
    for files in tree.splits.values():
        for _, mask in files.pairs:
            values = np.bincount(classes.apply(dataset.read_mask(mask))[0].ravel(), minlength=256)
            for c, name in enumerate(classes.names):
                counts[name] = counts.get(name, 0) + int(values[c])
    return counts


def main(args: argparse.Namespace) -> None:
    data = frames(args.camvid)[:: max(1, len(frames(args.camvid)) // args.frames) if args.frames else 1]
    truth = np.bincount(np.concatenate([ids.ravel() for _, _, ids in data]), minlength=12)
    os.environ["XDG_CACHE_HOME"] = str(args.work / "cache")  # an empty cache: the first open rasterises
    shutil.rmtree(args.work, ignore_errors=True)
    print(f"{len(data)} CamVid frames as each tool's export; {machine()}")
    print("| layout | first open (rasterising) | again | each class's pixels against the PNG masks |\n"
          "|---|---|---|---|")
    for layout in args.formats:
        root = args.work / layout
        note = WRITERS[layout](root, data)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            tree = dataset.open_tree(root, layout, val_fraction=None)
            times.append(time.perf_counter() - start)
        got = pixels_by_name(tree)
        off = {n: got.get(n, 0) / max(int(truth[c]), 1) - (truth[c] > 0) for c, n in enumerate(NAMES)}
        worst = sorted(off.items(), key=lambda item: -abs(item[1]))
        equal = all(got.get(n, 0) == truth[c] for c, n in enumerate(NAMES))
        said = "equal, every class" if equal else ", ".join(f"{n} {v:+.2%}" for n, v in worst[:4])
        print(f"| `{layout}` | {times[0]:.2f} s | {times[1]:.3f} s | {said}{f' ({note})' if note else ''} |")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", type=Path, default=CAMVID)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "exports-benchmark")
    parser.add_argument("--formats", nargs="+", default=list(WRITERS), choices=list(WRITERS))
    parser.add_argument("--frames", type=int, default=None, help="about this many frames, spread out (default: all)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
