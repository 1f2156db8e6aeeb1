"""Counter-based randomness: every random decision of the data pipeline is a pure function of
(seed, epoch, sample or batch index), so an epoch replays bit-identically and a run resumed at batch
k sees exactly what the uninterrupted run saw from batch k on, whatever the worker/thread layout.

The per-sample functions are numba-compiled once and called both from the ffcv decoder's parallel
loop and from Python (the ImageFolder backend), so both backends draw the same crops and flips for
the same (seed, epoch, sample). `rng_scope` gives the timm batch augmentations, which draw from the
global `random` / `numpy` / `torch` generators, a private per-batch stream and then restores the
caller's generator states.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from numba import njit

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53
_MASK = (1 << 64) - 1
_FLIP_COUNTER = 64  # the crop uses counters 0..39


@njit(cache=False, nogil=True)
def mix64(z):
    """SplitMix64 finaliser: a bijective, well-mixed uint64 -> uint64 hash."""
    z = np.uint64(z)
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=False, nogil=True)
def uniform(key, counter):
    """The counter-th uniform float in [0, 1) of the stream named by key (53 random bits)."""
    z = mix64(np.uint64(key) + np.uint64(counter) * _GOLDEN)
    return float(z >> _S11) * _INV53


@njit(cache=False, nogil=True)
def sample_key(epoch_key, index):
    """Key of one sample's stream within an epoch."""
    return mix64(np.uint64(epoch_key) ^ mix64(np.uint64(index) + _GOLDEN))


@njit(cache=False, nogil=True)
def crop_and_flip(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_prob, key):
    """torchvision RandomResizedCrop.get_params (10 tries, then the central fallback) plus the
    horizontal-flip coin, drawn from the sample's own stream. Returns (top, left, h, w, flip)."""
    height = np.int64(height)
    width = np.int64(width)
    area = float(height * width)
    flip = uniform(key, _FLIP_COUNTER) < flip_prob
    for attempt in range(10):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * attempt))
        aspect = np.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * uniform(key, 4 * attempt + 1))
        w = np.int64(round(np.sqrt(target_area * aspect)))
        h = np.int64(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(uniform(key, 4 * attempt + 2) * (height - h + 1))
            left = np.int64(uniform(key, 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w, flip
    in_ratio = width / height
    if in_ratio < np.exp(log_ratio_lo):
        w = width
        h = np.int64(round(w / np.exp(log_ratio_lo)))
    elif in_ratio > np.exp(log_ratio_hi):
        h = height
        w = np.int64(round(h * np.exp(log_ratio_hi)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def derive_key(*parts: int) -> int:
    """Combines integers (seed, epoch, rank, batch, ...) into one 64-bit stream key."""
    key = 0x6A09E667F3BCC908
    for part in parts:
        key = _mix64_int(((key ^ (int(part) & _MASK)) * 0x9E3779B97F4A7C15) & _MASK)
    return key


def _mix64_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def seed_global_generators(key: int) -> None:
    """Seeds `random`, `numpy.random` and torch's generators (CPU and CUDA) from one 64-bit key."""
    random.seed(key)
    np.random.seed([key & 0xFFFFFFFF, key >> 32])
    torch.manual_seed(key & 0x7FFFFFFFFFFFFFFF)


@contextlib.contextmanager
def rng_scope(key: int, device: torch.device) -> Iterator[None]:
    """Runs the block with `random`, `numpy.random` and torch's (CPU and `device`) generators seeded
    from key, then restores the caller's states: the training loop's own streams (dropout, drop-path)
    are not disturbed by the data pipeline, and each batch's augmentation depends on its key only."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed_global_generators(key)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
