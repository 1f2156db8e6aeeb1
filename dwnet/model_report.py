"""Prints parameter count and GFLOPs of the published DWNet models and checks a reference
checkpoint against its stored output.

    python -m dwnet.model_report --reference tests/data/dwnet_e24_d1121_c10.pth \
        --reference-io tests/data/dwnet_e24_d1121_c10_io.pt
"""
from __future__ import annotations

import argparse
import sys

import timm
import torch

from dwnet.models import PUBLISHED_MODELS, count_macs, count_parameters, create_model


def report_published_models(image_size: int = 224) -> None:
    print(f"{'model':<22}{'params':>14}{'GFLOPs@' + str(image_size):>12}")
    for name in PUBLISHED_MODELS:
        model = timm.create_model(name)
        gmacs = count_macs(model, (3, image_size, image_size)) / 1e9
        print(f"{name:<22}{count_parameters(model):>14,}{gmacs:>12.2f}")


def check_reference(model_name: str, checkpoint: str, io_file: str, atol: float = 1e-5) -> bool:
    io = torch.load(io_file, map_location="cpu", weights_only=True)
    model = create_model(model_name, checkpoint=checkpoint, strict=True,
                         num_classes=io["y"].shape[1]).eval()
    with torch.no_grad():
        err = (model(io["x"]) - io["y"]).abs().max().item()
    ok = err <= atol
    print(f"reference {checkpoint}: strict load ok, max |y - y_ref| = {err:.2e} "
          f"({'OK' if ok else 'MISMATCH'}, tolerance {atol:g})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="official-format checkpoint to check")
    parser.add_argument("--reference-io", help="torch file with the input 'x' and expected output 'y'")
    parser.add_argument("--reference-model", default="dwnet_femto", help="registered model of the reference")
    args = parser.parse_args(argv)
    report_published_models()
    if args.reference and args.reference_io:
        return 0 if check_reference(args.reference_model, args.reference, args.reference_io) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
