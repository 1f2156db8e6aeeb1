"""timm's RandAugment, applied per sample to a uint8 NCHW batch on the training device.

ffcv's pipeline is numba code, so timm's PIL RandAugment cannot run inside it, and running it on PIL
images in the training process (~1 ms per image and op on one core) would starve a GPU. Instead:

* the policy is timm's own: the spec string is parsed by `timm.data.rand_augment_transform` (so
  every option, `m`, `n`, `p`, `mstd`, `mmax`, `inc`, `t`, means what it means in timm), and each
  sample's op choice, apply coin, magnitude noise and level->argument mapping run timm's exact
  sampling steps with timm's own level functions;
* only the pixel operations are re-implemented, batched on tensors: for each layer, the samples that
  drew the same op are transformed together with per-sample arguments (one call per op, not per
  image), and all geometric ops of a layer share one bicubic `grid_sample` with PIL's coordinate
  convention and fill colour. `tests/test_loaders.py` checks each op against timm's PIL op.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from timm.data.auto_augment import _LEVEL_DENOM, rand_augment_transform

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
PIXEL = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
         "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast",
         "ContrastIncreasing", "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing",
         "Desaturate")


def timm_hparams(image_size: int, mean: Sequence[float]) -> dict:
    """What timm's transforms_imagenet_train passes to RandAugment for interpolation='bicubic'."""
    from PIL import Image

    return dict(translate_const=int(image_size * 0.45),
                img_mean=tuple(min(255, round(255 * m)) for m in mean),
                interpolation=Image.BICUBIC)


class BatchRandAugment:
    """`rand-m9-mstd0.5-inc1`-style RandAugment over a uint8 (N, 3, H, W) tensor, per sample.
    Draws from Python's `random` and numpy's global generator, like timm (the caller scopes them)."""

    def __init__(self, spec: str, hparams: dict) -> None:
        policy = rand_augment_transform(spec, dict(hparams))
        self.spec = spec
        self.ops = policy.ops
        self.num_layers = policy.num_layers
        self.choice_weights = policy.choice_weights
        unsupported = sorted({op.name for op in self.ops} - set(GEOMETRIC) - set(PIXEL))
        if unsupported:
            raise ValueError(f"augment.rand_augment={spec!r}: ops {unsupported} have no batched tensor "
                             "implementation; use the default op set (rand-m9-mstd0.5-inc1 style specs)")
        fill = self.ops[0].kwargs["fillcolor"]
        self.fill = tuple(float(v) for v in (fill if isinstance(fill, (tuple, list)) else (fill,) * 3))
        resample = self.ops[0].kwargs["resample"]
        self.random_interpolation = isinstance(resample, (tuple, list))

    def __repr__(self) -> str:
        return f"BatchRandAugment({self.spec!r}, n={self.num_layers}, ops={[op.name for op in self.ops]})"

    def sample(self, batch_size: int) -> list[dict[str, list[tuple[int, tuple]]]]:
        """Per layer: op name -> [(sample index, op args)], following timm's RandAugment.__call__ and
        AugmentOp.__call__ step by step for each image."""
        layers: list[dict[str, list[tuple[int, tuple]]]] = [defaultdict(list) for _ in range(self.num_layers)]
        for index in range(batch_size):
            chosen = np.random.choice(len(self.ops), self.num_layers, replace=self.choice_weights is None,
                                      p=self.choice_weights)
            for layer, op_index in enumerate(chosen):
                op = self.ops[op_index]
                if op.prob < 1.0 and random.random() > op.prob:
                    continue
                magnitude = op.magnitude
                if op.magnitude_std > 0:
                    if op.magnitude_std == float("inf"):
                        magnitude = random.uniform(0, magnitude)
                    else:
                        magnitude = random.gauss(magnitude, op.magnitude_std)
                magnitude = max(0.0, min(magnitude, op.magnitude_max or _LEVEL_DENOM))
                args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
                layers[layer][op.name].append((index, tuple(args)))
        return layers

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"BatchRandAugment expects a uint8 NCHW batch, got {images.dtype} {tuple(images.shape)}")
        out = images.clone()  # never write into the loader's reusable buffers
        for layer in self.sample(images.shape[0]):
            geometric = [(i, name, args) for name, entries in layer.items() if name in GEOMETRIC
                         for i, args in entries]
            for name, entries in layer.items():
                if name in GEOMETRIC:
                    continue
                index = torch.tensor([i for i, _ in entries], device=out.device)
                out[index] = apply_pixel_op(name, out[index], [args for _, args in entries])
            if geometric:
                index = torch.tensor([i for i, _, _ in geometric], device=out.device)
                height, width = out.shape[-2:]
                matrices = [pil_affine_matrix(name, args, width, height) for _, name, args in geometric]
                modes = ["bicubic" if not self.random_interpolation or random.random() < 0.5 else "bilinear"
                         for _ in geometric] if self.random_interpolation else None
                out[index] = affine_pil(out[index], matrices, self.fill, modes)
        return out


# ---- pixel ops: uint8 (n, 3, H, W) in, uint8 out, one argument tuple per image -------------------
def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(-1, 1, 1, 1)


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    return values.clamp_(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as a (n, 1, H, W) float."""
    weights = torch.tensor([19595, 38470, 7471], device=x.device, dtype=torch.int32).view(1, 3, 1, 1)
    return ((x.to(torch.int32) * weights).sum(1, keepdim=True) + 0x8000).div(65536, rounding_mode="floor").float()


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, image, factor), factors outside [0, 1] extrapolate."""
    return _to_uint8(torch.floor(degenerate + factor * (image.float() - degenerate)))


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.SMOOTH (3x3 kernel 1,1,1/1,5,1/1,1,1 / 13), border pixels left unchanged."""
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5
    kernel /= 13
    blurred = F.conv2d(x.float(), kernel, groups=3)
    out = x.float().clone()
    out[..., 1:-1, 1:-1] = torch.round(blurred)
    return out


def apply_pixel_op(name: str, x: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    if name == "AutoContrast":
        lo = x.amin(dim=(-2, -1), keepdim=True).float()
        hi = x.amax(dim=(-2, -1), keepdim=True).float()
        flat = hi <= lo
        scale = torch.where(flat, torch.ones_like(hi), 255.0 / (hi - lo).clamp(min=1))
        lo = torch.where(flat, torch.zeros_like(lo), lo)
        return _to_uint8(torch.floor((x.float() - lo) * scale))
    if name == "Equalize":
        return TF.equalize(x)
    if name == "Invert":
        return 255 - x
    if name.startswith("Posterize"):
        keep = torch.tensor([min(8, max(0, int(a[0]))) for a in args], device=x.device)
        mask = torch.bitwise_left_shift(torch.full_like(keep, 0xFF), 8 - keep) & 0xFF
        mask = mask.to(torch.uint8).view(-1, 1, 1, 1)
        return x & mask
    if name.startswith("Solarize") and name != "SolarizeAdd":
        thresh = _column([a[0] for a in args], x)
        return torch.where(x.float() >= thresh, 255 - x, x)
    if name == "SolarizeAdd":
        add = _column([a[0] for a in args], x)
        return torch.where(x < 128, _to_uint8(x.float() + add), x)
    factor = _column([a[0] for a in args], x)
    if name.startswith("Color") or name == "Desaturate":
        if name == "Desaturate":
            factor = (1.0 - factor).clamp(0.0, 1.0)
        return _blend(_gray(x).expand_as(x), x, factor)
    if name.startswith("Contrast"):
        mean = torch.floor(_gray(x).mean(dim=(-3, -2, -1), keepdim=True) + 0.5)
        return _blend(mean.expand_as(x), x, factor)
    if name.startswith("Brightness"):
        return _blend(torch.zeros_like(x, dtype=torch.float32), x, factor)
    if name.startswith("Sharpness"):
        return _blend(_smooth(x), x, factor)
    raise ValueError(f"unknown RandAugment op {name}")


# ---- geometric ops: PIL's Image.transform(AFFINE) / rotate semantics ------------------------------
def pil_affine_matrix(name: str, args: tuple, width: int, height: int) -> tuple[float, ...]:
    """The (a, b, c, d, e, f) PIL uses: output point (x, y) samples input (ax+by+c, dx+ey+f)."""
    if name == "ShearX":
        return (1, args[0], 0, 0, 1, 0)
    if name == "ShearY":
        return (1, 0, 0, args[0], 1, 0)
    if name == "TranslateXRel":
        return (1, 0, args[0] * width, 0, 1, 0)
    if name == "TranslateYRel":
        return (1, 0, 0, 0, 1, args[0] * height)
    if name == "TranslateX":
        return (1, 0, args[0], 0, 1, 0)
    if name == "TranslateY":
        return (1, 0, 0, 0, 1, args[0])
    if name == "Rotate":  # Image.rotate(degrees) about the centre, as Pillow builds it
        angle = -math.radians(args[0])
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
        cx, cy = width / 2.0, height / 2.0
        return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)
    raise ValueError(f"unknown geometric op {name}")


def affine_pil(x: torch.Tensor, matrices: list[tuple[float, ...]], fill: tuple[float, float, float],
               modes: list[str] | None = None) -> torch.Tensor:
    """Applies one PIL affine matrix per image: output pixel centre (j+.5, i+.5) reads the input at
    M·(x, y, 1); points outside the input get `fill`, inside are interpolated bicubically with edge
    pixels repeated (PIL's behaviour)."""
    n, _, height, width = x.shape
    device = x.device
    m = torch.tensor(matrices, dtype=torch.float32, device=device).view(n, 2, 3)
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, -1, 3)   # (1, HW, 3)
    source = points @ m.transpose(1, 2)                                          # (n, HW, 2)
    inside = ((source[..., 0] >= 0) & (source[..., 0] < width) &
              (source[..., 1] >= 0) & (source[..., 1] < height)).view(n, 1, height, width)
    grid = torch.stack([source[..., 0] * (2.0 / width) - 1, source[..., 1] * (2.0 / height) - 1], dim=-1)
    grid = grid.view(n, height, width, 2)
    image = x.float()
    if modes is None or all(mode == "bicubic" for mode in modes):
        sampled = F.grid_sample(image, grid, mode="bicubic", padding_mode="border", align_corners=False)
    else:
        sampled = torch.empty_like(image)
        for mode in set(modes):
            pick = torch.tensor([i for i, m_ in enumerate(modes) if m_ == mode], device=device)
            sampled[pick] = F.grid_sample(image[pick], grid[pick], mode=mode, padding_mode="border",
                                          align_corners=False)
    fill_value = torch.tensor(fill, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return _to_uint8(torch.where(inside, torch.round(sampled), fill_value))
