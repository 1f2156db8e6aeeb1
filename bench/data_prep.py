#!/usr/bin/env python
"""ImageFolder -> .beton conversion: `python -m data_prep convert` vs ffcv's own DatasetWriter.

    python bench/data_prep.py                          # 2-core defaults: 3,000 photos, 2 workers
    python bench/data_prep.py --images 20000 --workers 16

The baseline is the plain ffcv conversion (what ffcv-imagenet's write script does): torchvision's
ImageFolder with its PIL loader feeding `ffcv.writer.DatasetWriter` with an `RGBImageField` and an
`IntField`, in `--workers` processes. data_prep runs the same tree with the same options (max
resolution, write mode, JPEG quality, compress probability, worker count) and does more: it checks
every file (and would skip and list bad ones), converts odd formats, writes the skip report and
labels.json, and lays the records out reproducibly. Its target is to be at least as fast (>= 1.0x),
which needs each image decoded only once.

Images: ImageNet-sized crops (about 500x375, landscape and portrait) of the sample photos that ship
with scikit-image and scikit-learn, JPEG quality 90, under 10 class folders (bench/loader.py's tree).
Rounds alternate the two writers; the ratio is the median of per-round time ratios.

Each conversion is timed as a whole process by default, as a user sees it: `python -m data_prep
convert ...` against a process running the baseline, start-up (imports, numba compiling ffcv's
field code) and data_prep's fsync of the finished file included. `--in-process` times both inside
this process after a warm-up conversion each, which leaves the fixed costs out and measures the
per-image rate only.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import REPO_ROOT, median, print_machine, round_ratios, table, verdict
from photo_tree import write_photo_tree

# This file is bench/data_prep.py: with bench/ first on the path, `import data_prep` would find it
# instead of the package. The benchmark helpers are imported; from here on, the repository comes first.
sys.path[:] = [REPO_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(__file__)]

TARGET = 1.0


def ffcv_plain(tree: str, out: str, args: argparse.Namespace) -> int:
    """ffcv's writer on torchvision's ImageFolder, as ffcv-imagenet converts ImageNet."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(tree)
    fields = {"image": RGBImageField(write_mode=args.write_mode, max_resolution=args.max_resolution,
                                     jpeg_quality=args.jpeg_quality, compress_probability=0.5),
              "label": IntField()}
    DatasetWriter(os.path.join(out, "train.beton"), fields, num_workers=args.workers).from_indexed_dataset(dataset)
    return len(dataset)


def data_prep_convert(tree: str, out: str, args: argparse.Namespace) -> int:
    """`python -m data_prep convert --train-root TREE --out OUT ...`, in this process."""
    from data_prep.__main__ import main

    code = main(["convert", "--train-root", tree, "--out", out, *writer_options(args)])
    if code != 0:
        raise SystemExit(f"data_prep convert exited {code}")
    from ffcv.reader import Reader

    return int(Reader(os.path.join(out, "train.beton")).num_samples)


def writer_options(args: argparse.Namespace) -> list[str]:
    return ["--num-workers", str(args.workers), "--max-resolution", str(args.max_resolution),
            "--write-mode", args.write_mode, "--jpeg-quality", str(args.jpeg_quality)]


def as_process(fn) -> str:
    """The command line that runs `fn` as a process of its own."""
    return {ffcv_plain: "ffcv", data_prep_convert: "data_prep"}[fn]


def run_process(fn, tree: str, out: str, args: argparse.Namespace) -> int:
    if as_process(fn) == "data_prep":
        cmd = [sys.executable, "-m", "data_prep", "convert", "--train-root", tree, "--out", out]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--baseline-only", tree, out]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    subprocess.run(cmd + writer_options(args), cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    from ffcv.reader import Reader

    return int(Reader(os.path.join(out, "train.beton")).num_samples)


def timed(fn, tree: str, work: str, args: argparse.Namespace) -> tuple[float, int, int]:
    """Seconds, images written and file size of one conversion into a fresh folder (output quiet)."""
    out = tempfile.mkdtemp(dir=work)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            start = time.perf_counter()
            images = fn(tree, out, args) if args.in_process else run_process(fn, tree, out, args)
            seconds = time.perf_counter() - start
        return seconds, images, os.path.getsize(os.path.join(out, "train.beton"))
    finally:
        shutil.rmtree(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000, help="photos in the synthetic ImageFolder tree")
    p.add_argument("--workers", type=int, default=2, help="--num-workers for both writers")
    p.add_argument("--write-mode", choices=("proportion", "jpg", "raw"), default="proportion")
    p.add_argument("--max-resolution", type=int, default=500)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--rounds", type=int, default=3, help="conversions per writer, alternating")
    p.add_argument("--workdir", default="", help="keep the tree here (default: a temp dir)")
    p.add_argument("--strict", action="store_true", help="exit 1 if the target is missed")
    p.add_argument("--in-process", action="store_true",
                   help="time both writers inside this process after a warm-up (per-image rate, no start-up)")
    p.add_argument("--baseline-only", nargs=2, metavar=("TREE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--num-workers", type=int, help=argparse.SUPPRESS)  # the baseline process's options,
    args = p.parse_args(argv)                                           # spelled like data_prep's
    if args.baseline_only:
        args.workers = args.num_workers or args.workers
        os.makedirs(args.baseline_only[1], exist_ok=True)
        ffcv_plain(*args.baseline_only, args)
        return 0

    print_machine()
    cases = {"ffcv DatasetWriter (ImageFolder + PIL)": ffcv_plain, "data_prep convert": data_prep_convert}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        tree = os.path.join(work, f"tree-{args.images}")
        if not os.path.isdir(tree):
            write_photo_tree(tree, args.images, num_classes=10)
        print(f"{args.images} JPEGs (~500x375), --max-resolution {args.max_resolution}, --write-mode "
              f"{args.write_mode}, quality {args.jpeg_quality}, {args.workers} workers; "
              + ("in this process, one warm-up conversion each, then " if args.in_process else
                 "each conversion a whole process (start-up included), one warm-up each for the page cache, then ")
              + f"{args.rounds} alternating rounds")
        for fn in cases.values():  # warm-up: page cache (and, in process, imports and numba)
            timed(fn, tree, work, args)
        times: dict[str, list[float]] = {name: [] for name in cases}
        sizes: dict[str, int] = {}
        for round_ in range(args.rounds):
            for name in (list(cases) if round_ % 2 == 0 else list(reversed(cases))):
                seconds, images, sizes[name] = timed(cases[name], tree, work, args)
                if images != args.images:
                    raise SystemExit(f"{name} wrote {images} of {args.images} images")
                times[name].append(seconds)

    rows = [[name, f"{args.images / median(t):.0f}", f"{median(t):.2f}", f"{sizes[name] / 2**20:.1f}"]
            for name, t in times.items()]
    print()
    print(table(["writer", "images/s", "s (median)", "file MiB"], rows))
    baseline, ours = times.values()
    mid, lo, hi = round_ratios(baseline, ours)
    print()
    print(table(["ratio (same run, median of per-round ratios)", "ratio", "range", "target", "result"],
                [["data_prep convert speed / ffcv DatasetWriter speed", f"{mid:.2f}x", f"{lo:.2f}-{hi:.2f}",
                  f">= {TARGET}", verdict(mid, TARGET)]]))
    return 1 if (args.strict and mid < TARGET) else 0


if __name__ == "__main__":
    sys.exit(main())
