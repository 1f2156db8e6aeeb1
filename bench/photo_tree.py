"""An ImageNet-like ImageFolder tree made from the sample photos that ship with scikit-image and
scikit-learn: real photographic JPEGs (so decode cost and file sizes are realistic, unlike noise),
about 500x375 by default, cut, flipped and colour-shifted per image so no two files are the same.

    python bench/photo_tree.py /tmp/photos --images 4096 --classes 16

Nothing is downloaded: both packages carry their sample photos inside the wheel.
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image


def sample_photos() -> list[np.ndarray]:
    """The colour photos bundled with scikit-image and scikit-learn, as RGB uint8 arrays."""
    photos: list[np.ndarray] = []
    try:
        import skimage.data as sk

        for name in ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry",
                     "hubble_deep_field", "colorwheel"):
            try:
                photos.append(np.asarray(getattr(sk, name)())[..., :3])
            except Exception:  # a sample missing from this release (some need pooch): use the rest
                pass
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        photos.extend(np.asarray(img)[..., :3] for img in load_sample_images().images)
    except ImportError:
        pass
    photos = [p for p in photos if p.ndim == 3 and min(p.shape[:2]) >= 64]
    if not photos:
        raise RuntimeError("no sample photos found: install scikit-image or scikit-learn")
    return photos


def _variant(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop (40-100% of each side) resized to `size`, maybe mirrored, with a colour shift."""
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.7, 1.3, size=3)
    shifted = np.clip(np.asarray(crop, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(shifted)


def _write_chunk(args: tuple[str, list[tuple[int, int]], tuple[int, int], int, int]) -> int:
    root, items, size, quality, seed = args
    photos = sample_photos()
    for index, label in items:
        rng = np.random.default_rng([seed, index])
        landscape = rng.random() < 0.75  # ImageNet is mostly landscape
        shape = size if landscape else (size[1], size[0])
        image = _variant(photos[index % len(photos)], shape, rng)
        image.save(os.path.join(root, f"class{label:04d}", f"img{index:07d}.JPEG"), quality=quality)
    return len(items)


def write_photo_tree(root: str, num_images: int, num_classes: int, *, size: tuple[int, int] = (500, 375),
                     quality: int = 90, seed: int = 0, workers: int | None = None) -> str:
    """Writes `num_images` JPEGs spread evenly over `num_classes` folders under `root`; returns root.
    The result depends only on the arguments (not on `workers`)."""
    if num_images < 1 or num_classes < 1:
        raise ValueError(f"num_images={num_images}, num_classes={num_classes}: both must be >= 1")
    for label in range(num_classes):
        os.makedirs(os.path.join(root, f"class{label:04d}"), exist_ok=True)
    items = [(i, i % num_classes) for i in range(num_images)]
    workers = max(1, min(workers or os.cpu_count() or 1, num_images))
    chunks = [(root, items[w::workers], size, quality, seed) for w in range(workers)]
    if workers == 1:
        _write_chunk(chunks[0])
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_chunk, chunks))
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="output folder (ImageFolder layout: <root>/classNNNN/*.JPEG)")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    write_photo_tree(args.root, args.images, args.classes, size=(args.width, args.height), quality=args.quality,
                     seed=args.seed, workers=args.workers)
    print(f"wrote {args.images} JPEGs ({args.width}x{args.height}) in {args.classes} classes under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
