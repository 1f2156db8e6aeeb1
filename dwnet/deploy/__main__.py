"""python -m dwnet.deploy --model NAME --checkpoint FILE.pth --out FILE.onnx [--fuse-bn]
[--batch dynamic|N] [--image-size PX]: writes FILE.onnx and FILE.pt2, checked against PyTorch."""
import argparse
import sys
from typing import Optional


def _positive(value: str) -> int:
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: use a positive integer")


def _batch(value: str) -> Optional[int]:
    return None if value == "dynamic" else _positive(value)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dwnet.deploy", description=__doc__)
    p.add_argument("--model", required=True, help="registered model name, e.g. dwnet_tiny")
    p.add_argument("--checkpoint", required=True, help="released or exported .pth (classes read from it)")
    p.add_argument("--out", required=True, help="ONNX file to write; the torch.export program goes to .pt2")
    p.add_argument("--fuse-bn", action="store_true", help="fold every BatchNorm into its neighbour layer")
    p.add_argument("--batch", type=_batch, default=None, metavar="dynamic|N",
                   help="batch dimension: dynamic (default) or a fixed size")
    p.add_argument("--image-size", type=_positive, default=None, help="input side in pixels (default: the model's, 224)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # Imported here so that --help is instant and a missing dependency is one line.
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        print(f"error: {err.name} is not installed; pip install -e '.[deploy]' (make setup does)", file=sys.stderr)
        return 2
    from dwnet.models import CheckpointMismatchError

    from .export import DeployError, deploy

    try:
        report = deploy(args.model, args.checkpoint, args.out, fuse_bn=args.fuse_bn, batch=args.batch,
                        image_size=args.image_size)
    except (DeployError, CheckpointMismatchError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
