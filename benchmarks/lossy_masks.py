"""How many labelled pixels of JPEG colour masks keep their class, by the tolerance within which a value matches a
class colour (dataset.LOSSY_TOLERANCE; BENCHMARKS.md, "Exports of annotation tools, lossy masks").

    python benchmarks/lossy_masks.py [--camvid ../shared/data/camvid] [--masks 20]

The first --masks CamVid training masks, coloured with its table's colours (camvid's classes.csv), saved as
quality-90 JPEGs by Pillow, read back as colour masks and matched.
"""

import argparse
import io
from pathlib import Path

import numpy as np
from common import CAMVID, machine
from PIL import Image

import dataset


def main(args: argparse.Namespace) -> None:
    table = dataset.read_class_table(args.camvid / "classes.csv")
    palette = np.array([row.colour for row in sorted(table.rows, key=lambda row: row.id)], np.uint8)
    masks = [dataset.read_mask(path) for path in sorted((args.camvid / "train" / "masks").iterdir())[:args.masks]]
    jpegs = []
    for ids in masks:
        buffer = io.BytesIO()
        Image.fromarray(palette[ids]).save(buffer, "JPEG", quality=90)
        jpegs.append(np.asarray(Image.open(buffer).convert("RGB")))
    print(f"{len(masks)} CamVid masks as quality-90 JPEGs; {machine()}")
    print("| tolerance | right class | wrong class | ignored |\n|---|---|---|---|")
    default = dataset.LOSSY_TOLERANCE
    for tolerance in (0, 8, 16, 24, 32):
        dataset.LOSSY_TOLERANCE = tolerance
        colours = dataset.class_map_of(table, "colour")
        right = wrong = total = 0
        for ids, jpeg in zip(masks, jpegs):
            got, _ = colours.apply(jpeg, lossy=True)
            labelled = ids < 11
            right += (got == ids)[labelled].sum()
            wrong += ((got != ids) & (got != dataset.IGNORE_INDEX))[labelled].sum()
            total += labelled.sum()
        mark = " (the default)" if tolerance == default else ""
        print(f"| {tolerance}{mark} | {right / total:.2%} | {wrong / total:.3%} | {1 - (right + wrong) / total:.2%} |")
    dataset.LOSSY_TOLERANCE = default


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--camvid", type=Path, default=CAMVID)
    parser.add_argument("--masks", type=int, default=20)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
