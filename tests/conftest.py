import os
from pathlib import Path

import pytest

# The suite runs DeepSpeed on the CPU even where a GPU is visible (its multi-rank tests put several
# ranks on one machine); `bench/gpu_check.sh` sets DWNET_GPU_TESTS=1 to run the tests marked `gpu`.
if os.environ.get("DWNET_GPU_TESTS") != "1":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo process group on loopback for in-process DeepSpeed engines."""
    from dwnet.distributed import free_port, init_distributed

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    return init_distributed()


# ---- image trees and .beton files for the data tests (tests/test_data_prep.py, test_loaders.py) ----
DIGITS_TRAIN, DIGITS_VAL = 160, 47  # val deliberately odd: exercises the -1 padding with 2 ranks


def digit_images(start: int, count: int):
    """Real 8x8 scikit-learn digits, upscaled to 32x32 RGB uint8, with their labels."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(start, start + count):
        gray = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(gray).resize((32, 32), Image.BICUBIC).convert("RGB")
        yield i, int(digits.target[i]), image


def write_digits_tree(root: Path, start: int, count: int) -> None:
    for i, label, image in digit_images(start, count):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=95)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """<root>/train (160 digits) and <root>/val (47 digits), ImageFolder layout, 10 classes."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_tree(root / "train", 0, DIGITS_TRAIN)
    write_digits_tree(root / "val", DIGITS_TRAIN, DIGITS_VAL)
    return root


@pytest.fixture(scope="session")
def digits_betons(digits_root, tmp_path_factory) -> Path:
    """train.beton, val.beton and labels.json converted once per session by the real CLI code."""
    from data_prep.__main__ import main

    out = tmp_path_factory.mktemp("digits_ffcv")
    assert main(["convert", "--root", str(digits_root), "--out", str(out), "--num-workers", "2"]) == 0
    return out
