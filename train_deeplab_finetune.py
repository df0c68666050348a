"""Fine-tune a trained DeepLab checkpoint: the phases of the off-road study, on the shared training loop.

    python train_deeplab_finetune.py --unfreeze --lr-backbone 1e-5      # the newest runs/*/best.pth
    python train_deeplab_finetune.py --checkpoint runs/base/best.pth --freeze-backbone          # phase 2.1
    python train_deeplab_finetune.py --checkpoint runs/head/best.pth --unfreeze --lr-backbone 1e-5  # phase 2.2

The model's arch and classes come from the checkpoint; data flags default to the checkpoint's run. Every flag
of train_deeplab.py works here too (losses, class weights, crops, schedules, early stopping).
"""

import argparse
import sys
from pathlib import Path

from dataset import ArgumentParser
from models import ModelError, load_checkpoint
from train_deeplab import RUNS, resume_run, run
from train_deeplab import get_args_parser as get_train_parser

# flags that, when not given, are taken from the checkpoint's own run; with its data (no --data), also DATA_FLAGS
INHERITED = ("num_classes", "class_names", "classes", "size", "output_stride", "atrous_rates")
DATA_FLAGS = ("layout", "mask_encoding", "val_fraction")


def inherit_from_checkpoint(args: argparse.Namespace, checkpoint: dict) -> None:
    """Arch and data come from the checkpoint unless given; an explicit other arch is an error."""
    original = checkpoint["args"]
    if args.arch is None:
        args.arch = original["arch"]
    elif args.arch != original["arch"]:
        raise ModelError(f"--checkpoint {args.checkpoint} holds a {original['arch']} model, not --arch {args.arch}")
    if args.data is None:
        args.data = Path(original["data"]) if original.get("data") else None
        for name in DATA_FLAGS:
            if getattr(args, name) in ("auto", None):
                setattr(args, name, original.get(name, getattr(args, name)))
    for name in INHERITED:
        value = original.get(name)
        if getattr(args, name) is None:
            setattr(args, name, Path(value) if name == "classes" and value else value)


def newest_best(runs: Path) -> Path:
    """The best.pth under `runs` that its run wrote last: the study fine-tunes the model it has just trained."""
    found = max(runs.glob("**/best.pth"), key=lambda path: path.stat().st_mtime, default=None)
    if found is None:
        sys.exit(
            f"error: no --checkpoint given and no {runs}/*/best.pth to fine-tune; train first (python train_deeplab.py)"
        )
    return found


def main(args: argparse.Namespace) -> None:
    if args.unfreeze and args.freeze_backbone:
        sys.exit("error: --unfreeze and --freeze-backbone exclude each other")
    if args.checkpoint is None and args.resume is None:
        args.checkpoint = newest_best(RUNS)
        print(f"Fine-tuning {args.checkpoint}, the newest best.pth under {RUNS}/ (--checkpoint picks another)")

    def prepare() -> tuple[argparse.Namespace, dict | None, dict | None]:
        if args.resume:  # the interrupted run's own flags and state; its starting checkpoint is not needed again
            return resume_run(args.resume)
        checkpoint = load_checkpoint(args.checkpoint)
        inherit_from_checkpoint(args, checkpoint)
        return args, checkpoint, None

    run(prepare)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Fine-tune a DeepLab checkpoint", parents=[get_train_parser(add_help=False)], add_help=add_help
    )
    parser.set_defaults(arch=None, patience=2, epochs=6)
    parser.add_argument("--checkpoint", type=Path, default=None, help="best.pth or last.pth of an earlier run")
    parser.add_argument("--unfreeze", action="store_true", help="train the backbone too (pair with --lr-backbone)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
