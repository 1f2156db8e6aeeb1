"""Command line: `python -m data_prep convert ...` and `python -m data_prep verify FILE.beton`."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

DESCRIPTION = """\
Convert ImageFolder trees (<root>/<class>/<image>) to ffcv .beton files, and check .beton files.

  python -m data_prep convert --root /data/imagenet --out /data/ffcv      # train/ and val/ inside
  python -m data_prep convert --train-root /data/pets/train --out out      # one split
  python -m data_prep verify /data/ffcv/train.beton
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{convert,verify}")

    conv = commands.add_parser(
        "convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="write <out>/train.beton, <out>/val.beton and <out>/labels.json",
        description="Scan the tree(s), then decode every image once in parallel: unusable files are reported "
                    "in <out>/skipped_<split>.tsv and never written, the others are resized, encoded and "
                    "written. Each split is written atomically (temporary name, renamed at the end) and "
                    "byte-for-byte reproducibly (same tree, options and --seed: same file, whatever "
                    "--num-workers). Class indices follow torchvision's ImageFolder (sorted folder names), "
                    "saved as <out>/labels.json.")
    src = conv.add_argument_group("input (use --root, or --train-root and/or --val-root)")
    src.add_argument("--root", help="folder holding train/ and val/ ImageFolder trees (whichever exist)")
    src.add_argument("--train-root", help="ImageFolder tree converted as the train split")
    src.add_argument("--val-root", help="ImageFolder tree converted as the val split")
    src.add_argument("--only", choices=("train", "val"), help="convert just this split of the ones given")
    conv.add_argument("--out", required=True, help="output folder (created if missing)")
    fmt = conv.add_argument_group("stored images (ffcv RGBImageField)")
    fmt.add_argument("--max-resolution", type=int, default=500,
                     help="resize so the longer side is at most this many pixels (0: keep originals). 500 follows "
                          "ffcv-imagenet: RandomResizedCrop takes crops down to 8%% of the area, so a larger "
                          "stored image keeps 224px crops sharp; eval (resize 256, crop 224) is unaffected")
    fmt.add_argument("--write-mode", choices=("jpg", "raw", "smart", "proportion"), default="proportion",
                     help="proportion (ffcv-imagenet's choice): JPEG a random --compress-probability share, store "
                          "the rest as pixels, trading disk for decode time; jpg: JPEG every image (smallest "
                          "file, slowest to read); raw: pixels only (fastest, ~10x larger than jpg); smart: JPEG "
                          "only images above --smart-threshold bytes")
    fmt.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (1-100)")
    fmt.add_argument("--compress-probability", type=float, default=0.5, help="share JPEG-compressed in proportion mode")
    fmt.add_argument("--seed", type=int, default=0,
                     help="proportion mode: which images are JPEG is drawn per image from this seed and the "
                          "file's path in the tree, so a conversion is reproducible")
    fmt.add_argument("--smart-threshold", type=int, default=256 * 256 * 3,
                     help="smart mode: raw size in bytes above which an image is stored as JPEG")
    run = conv.add_argument_group("run")
    run.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                     help="threads decoding and encoding images (the output does not depend on it)")
    run.add_argument("--subset", type=int, default=0,
                     help="write only N images per split (0: all), taken deterministically class by class in "
                          "turn (first image of every class, then the second, ...), topped up past bad files")
    run.add_argument("--strict", action="store_true",
                     help="exit 1 without installing the split if any file had to be skipped (the report is "
                          "still written)")
    run.add_argument("--overwrite", action="store_true",
                     help="rewrite <split>.beton if it already exists (default: keep it and convert only "
                          "missing splits, so rerunning after an interruption finishes the job)")

    ver = commands.add_parser("verify", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="check a .beton file and print what it holds",
                              description="Check the file's structure (header, metadata, allocation table: "
                                          "catches truncation), print sample count, label histogram and image "
                                          "sizes, and decode a spread of records both byte by byte and through "
                                          "ffcv's Loader. Exit 1 with a one-line reason if anything is wrong.")
    ver.add_argument("file", help="the .beton file")
    ver.add_argument("--decode", type=int, default=256, help="records to decode (0: all)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command != "convert":
        return
    if args.max_resolution < 0:
        parser.error("--max-resolution must be >= 0 (0 keeps the original size)")
    if not 1 <= args.jpeg_quality <= 100:
        parser.error("--jpeg-quality must be in 1..100")
    if not 0 <= args.compress_probability <= 1:
        parser.error("--compress-probability must be in [0, 1]")
    if args.num_workers < 1:
        parser.error("--num-workers must be >= 1")
    if args.subset < 0:
        parser.error("--subset must be >= 0")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    # heavy imports (torch, ffcv, numba) only once the arguments are known to be good
    from dwnet.errors import UserError, debug_tracebacks

    from .convert import WriteOptions
    from .verify import verify_beton

    try:
        if args.command == "verify":
            report = verify_beton(args.file, decode=args.decode)
            print("\n".join(report.lines))
            print("OK")
            return 0
        from .run import ConvertRequest, convert, resolve_splits

        options = WriteOptions(max_resolution=args.max_resolution or None, write_mode=args.write_mode,
                               jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                               smart_threshold=args.smart_threshold, num_workers=args.num_workers, seed=args.seed)
        request = ConvertRequest(splits=resolve_splits(args.root, args.train_root, args.val_root, args.only),
                                 out=args.out, options=options, subset=args.subset, strict=args.strict,
                                 overwrite=args.overwrite)
        return convert(request)
    except UserError as err:  # bad input: one line (the traceback would only show where it was noticed)
        if debug_tracebacks():
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was installed under a final name; rerun the same command", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
