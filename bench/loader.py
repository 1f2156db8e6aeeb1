#!/usr/bin/env python
"""Training input pipeline: ffcv .beton vs torchvision ImageFolder + PIL, images/s, one process.

    python bench/loader.py                         # 2-core defaults: 768 photos, 224px, 2 workers
    python bench/loader.py --images 4096 --workers 16 --batch 256

Both sides are `dwnet.data.build_train_loader` with the same config except `data.backend`: the
same per-sample RandomResizedCrop(0.08-1, 3/4-4/3) + flip draws, the same resolution, batch and
worker count (ffcv: numba threads; ImageFolder: DataLoader processes), uint8 -> normalised float
on the same device. Batch-level augmentations (RandAugment, erasing, mixup) run after either
loader on the same tensors, so they are off by default (`--batch-augment` turns them on).

Images: ImageNet-sized crops (about 500x375, the size ffcv-imagenet stores) of the sample photos
that ship with scikit-image and scikit-learn, written as JPEG quality 90 under 10 class folders,
then converted by `python -m data_prep convert` (--max-resolution 500 and, by default, the
converter's ffcv-imagenet write mode: half the images JPEG quality 90, half raw pixels). The epochs
alternate between the two loaders and the ratio is the median of per-round ratios. Target: >= 3x.
Two outputs are timed: the uint8 crops the reader puts on the device, and the normalised float
batches the trainer consumes (the target is judged on the latter).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

from common import REPO_ROOT, median, print_machine, round_ratios, table, verdict
from photo_tree import write_photo_tree

import torch  # noqa: E402

from dwnet.config import AugmentConfig, DataConfig  # noqa: E402
from dwnet.data import build_train_loader  # noqa: E402

TARGET = 3.0
STAGES = {"uint8": "uint8 crops on the device", "float": "normalised float batches"}


def epoch_time(loader, epoch: int, stage: str) -> tuple[float, int]:
    """Seconds and images for one epoch of `stage`: "uint8" = the reader's decoded, cropped and
    flipped uint8 batches on the device (on a GPU run, normalisation and augmentation then run on
    the GPU); "float" = the full loader output, normalised float batches."""
    batches = loader.epoch(epoch) if stage == "float" else \
        loader.reader.batches(loader.epoch_indices(epoch), epoch_key=1000 + epoch)
    start, images = time.perf_counter(), 0
    for x, _ in batches:
        images += x.shape[0]
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=768, help="photos in the synthetic train tree")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decode workers for both loaders")
    p.add_argument("--rounds", type=int, default=3, help="epochs per loader, alternating")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-augment", action="store_true", help="also RandAugment, erasing and mixup/cutmix")
    p.add_argument("--write-mode", choices=("proportion", "jpg", "raw"), default="proportion",
                   help="how data_prep stores the images (its --write-mode)")
    p.add_argument("--workdir", default="", help="keep the tree and .beton here (default: a temp dir)")
    p.add_argument("--strict", action="store_true", help="exit 1 if the target is missed")
    args = p.parse_args(argv)

    print_machine(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        tree, out = os.path.join(work, "tree"), os.path.join(work, "beton")
        if not os.path.isdir(tree):
            write_photo_tree(tree, args.images, num_classes=10)
        out = f"{out}-{args.write_mode}"
        if not os.path.isfile(os.path.join(out, "train.beton")):
            subprocess.run([sys.executable, "-m", "data_prep", "convert", "--train-root", tree, "--out", out,
                            "--max-resolution", "500", "--write-mode", args.write_mode,
                            "--num-workers", str(args.workers)],
                           check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        augment = AugmentConfig() if args.batch_augment else AugmentConfig(
            rand_augment="", random_erasing=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
        data = DataConfig(image_size=args.image_size, batch_size=args.batch, num_workers=args.workers)
        configs = {"ffcv": dataclasses.replace(data, backend="ffcv", train_path=os.path.join(out, "train.beton")),
                   "imagefolder+PIL": dataclasses.replace(data, backend="imagefolder", train_path=tree)}
        loaders = {name: build_train_loader(cfg, augment, num_classes=10, rank=0, world_size=1, seed=0,
                                            device=torch.device(args.device)) for name, cfg in configs.items()}
        print(f"{args.images} JPEGs (~500x375; .beton write mode {args.write_mode}), {args.image_size}px, batch {args.batch}, {args.workers} workers, "
              f"{args.device}, batch augmentations {'on' if args.batch_augment else 'off'}, "
              f"{args.rounds} alternating epochs per loader after one warm-up epoch each")
        for loader in loaders.values():  # warm-up: numba compilation, worker start, page cache
            epoch_time(loader, 0, "float")
        times: dict[tuple[str, str], list[float]] = {}
        counts: dict[tuple[str, str], int] = {}
        for round_ in range(1, args.rounds + 1):
            for stage in STAGES:
                order = list(loaders) if round_ % 2 else list(reversed(loaders))
                for name in order:
                    seconds, counts[name, stage] = epoch_time(loaders[name], round_, stage)
                    times.setdefault((name, stage), []).append(seconds)

    rows = [[name, STAGES[stage], f"{counts[name, stage] / median(t):.0f}", f"{median(t):.2f}"]
            for (name, stage), t in times.items()]
    print()
    print(table(["train loader", "output", "images/s", "s/epoch (median)"], rows))
    ratio_rows, mids = [], {}
    for stage, what in STAGES.items():
        mid, lo, hi = round_ratios(times["imagefolder+PIL", stage], times["ffcv", stage])
        mids[stage] = mid
        ratio_rows.append([f"ffcv / imagefolder+PIL, {what}", f"{mid:.2f}x", f"{lo:.2f}-{hi:.2f}", f">= {TARGET}",
                           verdict(mid, TARGET)])
    print()
    print(table(["ratio (same run, median of per-round ratios)", "ratio", "range", "target", "result"], ratio_rows))
    print("(on a CPU-only machine the normalisation runs on the same cores as the decoding, in the training"
          " process; on a GPU run it happens on the GPU)")
    mid = mids["float"]
    return 1 if (args.strict and mid < TARGET) else 0


if __name__ == "__main__":
    sys.exit(main())
