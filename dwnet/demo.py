"""`make demo`: the whole system end to end on a small real data set, on CPU.

1. scikit-learn's 1,797 handwritten digits -> an ImageFolder tree of 32x32 JPEGs (stratified
   80/20 train/val split)
2. data_prep -> demo_data/beton/{train,val}.beton + labels.json
3. deepspeed launcher, 2 CPU ranks, ZeRO-2, fp32 with clipping: train.py --config ds_configs/demo_cpu.yaml
4. train.py --eval on the best checkpoint, train.py --export of the consolidated fp32 weights
5. top-1 / top-5 and a per-class accuracy table from the exported file

Re-running reuses the converted data and resumes (or, when finished, just re-evaluates) the run;
`--fresh` starts the training over. TensorBoard logs: runs/demo/tensorboard.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from dwnet.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "ds_configs/demo_cpu.yaml"
DATA_DIR = "demo_data"
RUN_DIR = "runs/demo"
EXPORT = f"{RUN_DIR}/dwnet_nano_digits_fp32.pth"


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def write_digits_tree(out: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """Writes <out>/{train,val}/<digit>/<index>.jpg; returns (train, val) counts."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    idx_train, idx_val = train_test_split(np.arange(len(images)), test_size=val_fraction,
                                          stratify=digits.target, random_state=seed)
    for split, indices in (("train", idx_train), ("val", idx_val)):
        for i in indices:
            folder = os.path.join(out, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            img = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
    return len(idx_train), len(idx_val)


def run(cmd: list[str], **kwargs) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def prepare_data(python: str) -> None:
    beton_dir = os.path.join(DATA_DIR, "beton")
    if all(os.path.isfile(os.path.join(beton_dir, f)) for f in ("train.beton", "val.beton", "labels.json")):
        print(f"reusing {beton_dir}/ (delete it to convert again)")
        return
    banner("1/5 digits -> ImageFolder tree of JPEGs")
    tree = os.path.join(DATA_DIR, "digits")
    shutil.rmtree(tree, ignore_errors=True)
    n_train, n_val = write_digits_tree(os.path.join(ROOT, tree))
    print(f"{n_train} train + {n_val} val images in {tree}/")
    banner("2/5 data_prep -> .beton")
    run([python, "-m", "data_prep", "convert", "--train-root", f"{tree}/train", "--val-root", f"{tree}/val",
         "--out", beton_dir, "--max-resolution", "32", "--num-workers", "2"])
    run([python, "-m", "data_prep", "verify", f"{beton_dir}/val.beton", "--decode", "64"])


def train(python: str, ranks: int) -> None:
    banner(f"3/5 training: deepspeed launcher, {ranks} CPU ranks, ZeRO-2, fp32")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    deepspeed = os.path.join(os.path.dirname(python), "deepspeed")
    run([deepspeed, "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "train.py", "--config", CONFIG], env=env)


def evaluate_and_export(python: str) -> None:
    banner("4/5 evaluation of the best checkpoint and fp32 export")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    run([python, "train.py", "--config", CONFIG, "--eval", "--checkpoint-tag", "best"], env=env)
    run([python, "train.py", "--config", CONFIG, "--export", EXPORT, "--checkpoint-tag", "best"], env=env)


def per_class_report() -> float:
    """Top-1/top-5 and per-class accuracy of the exported weights on the val split."""
    import torch

    from dwnet.config import load_config
    from dwnet.data import build_val_loader
    from dwnet.models import create_model

    banner("5/5 per-class accuracy of the exported model")
    cfg = load_config(CONFIG)
    model = create_model(cfg.model.name, checkpoint=EXPORT, num_classes=cfg.model.num_classes).eval()
    loader = build_val_loader(cfg.data, rank=0, world_size=1, device=torch.device("cpu"))
    with open(os.path.join(DATA_DIR, "beton", "labels.json")) as fh:
        names = {v: k for k, v in json.load(fh).items()}
    correct = np.zeros(cfg.model.num_classes)
    total = np.zeros(cfg.model.num_classes)
    top5 = 0
    with torch.no_grad():
        for images, labels in loader:
            keep = labels >= 0
            logits = model(images[keep])
            labels = labels[keep]
            np.add.at(total, labels.numpy(), 1)
            np.add.at(correct, labels.numpy(), (logits.argmax(1) == labels).numpy())
            top5 += (logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item()
    print(f"{'class':>6} {'images':>7} {'top-1':>7}")
    for c in range(cfg.model.num_classes):
        print(f"{names.get(c, c):>6} {int(total[c]):>7} {100 * correct[c] / max(total[c], 1):>6.1f}%")
    top1 = 100 * correct.sum() / total.sum()
    print(f"{'all':>6} {int(total.sum()):>7} {top1:>6.1f}%   top-5 {100 * top5 / total.sum():.1f}%")
    print(f"exported weights: {EXPORT} (official format, loads with timm.create_model(..., "
          f"pretrained_cfg_overlay=dict(file=...)))\nTensorBoard: tensorboard --logdir {RUN_DIR}/tensorboard")
    return top1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete runs/demo and train from scratch")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks for the deepspeed launcher")
    parser.add_argument("--min-top1", type=float, default=95.0, help="exit non-zero below this val top-1")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    python = sys.executable
    start = time.time()
    if args.fresh:
        shutil.rmtree(RUN_DIR, ignore_errors=True)
    prepare_data(python)
    train(python, args.ranks)
    evaluate_and_export(python)
    top1 = per_class_report()
    print(f"\ndemo finished in {time.time() - start:.0f} s: val top-1 {top1:.1f}% "
          f"({'meets' if top1 >= args.min_top1 else 'BELOW'} the {args.min_top1:.0f}% target)")
    return 0 if top1 >= args.min_top1 else 1


if __name__ == "__main__":
    sys.exit(main())
