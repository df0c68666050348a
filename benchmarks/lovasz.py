"""Every loss's forward + backward, and Lovász-softmax against the per-class loop it replaces (BENCHMARKS.md,
"Losses").

    python benchmarks/lovasz.py [--size 256 512] [--batch-size 2] [--num-classes 19] [--runs 5] [--device cuda]

The loop is Lovász-softmax as Berman et al.'s reference code and smp's port of it compute it: one class at a time,
ignored pixels dropped by boolean indexing, a host sync per class. losses.lovasz_softmax sorts every class at once.
The losses take turns, one step each per round; logits random, 5% of the targets ignored.
"""

import argparse

import torch
from common import in_turns, machine

from dataset import IGNORE_INDEX
from losses import LOSS_NAMES, LovaszSoftmaxLoss, build_loss


def lovasz_per_class_loop(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Berman et al.'s lovasz_softmax_flat ('present' classes) over the batch as one image, class by class."""
    probs = logits.float().softmax(1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    keep = labels != IGNORE_INDEX
    probs, labels = probs[keep], labels[keep]
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).float()
        if fg.sum() == 0:  # a host sync per class
            continue
        errors_sorted, perm = torch.sort((fg - probs[:, c]).abs(), descending=True)
        fg_sorted = fg[perm]
        gts = fg_sorted.sum()
        jaccard = 1 - (gts - fg_sorted.cumsum(0)) / (gts + (1 - fg_sorted).cumsum(0))
        grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors_sorted, grad))
    return torch.stack(losses).mean()


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch_size, args.num_classes, *args.size, generator=g).to(device).requires_grad_(True)
    target = torch.randint(0, args.num_classes, (args.batch_size, *args.size), generator=g)
    target[torch.rand(args.batch_size, *args.size, generator=g) < 0.05] = IGNORE_INDEX
    target = target.to(device)
    losses = {name: build_loss(name, args.num_classes).to(device) for name in LOSS_NAMES}
    losses["lovasz per_image"] = LovaszSoftmaxLoss(per_image=True)
    losses["lovasz, per-class loop"] = lovasz_per_class_loop
    values = {}

    def step(name: str) -> None:
        value = losses[name](logits, target)
        value.backward()
        values[name], logits.grad = value.item(), None

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    seconds = in_turns({name: lambda name=name: step(name) for name in losses}, args.runs, sync=sync)
    print(f"forward + backward, logits {args.batch_size}x{args.num_classes}x{args.size[0]}x{args.size[1]}, median of "
          f"{args.runs} in turns; {machine()}")
    print("| loss | ms | x ce | value |\n|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {1000 * s:.2f} | {s / seconds['ce']:.2f} | {values[name]:.6f} |")
    loop, ours = seconds["lovasz, per-class loop"], seconds["lovasz"]
    print(f"lovasz: {loop / ours:.2f}x the per-class loop's speed, values differing by "
          f"{abs(values['lovasz'] - values['lovasz, per-class loop']):.1e}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
