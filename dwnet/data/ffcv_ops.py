"""ffcv image decoders: decode -> crop -> resize (libffcv's cv2 INTER_AREA, as ffcv's own) per sample
in ffcv's numba threads, with two changes to ffcv's RandomResizedCrop / CenterCrop decoders:

* reproducible randomness: ffcv's random crop and RandomHorizontalFlip draw from numba's per-thread
  generators, which cannot be seeded so that results do not depend on which thread decodes which
  sample, so a run never replays. Here every random number comes from `rng.crop_and_flip` keyed by
  (epoch key, sample index); the epoch key lives in a one-element array that Python sets before each
  epoch and the compiled code reads through its address (numba freezes captured arrays as
  constants), so nothing is recompiled between epochs.
* libffcv's C functions are called directly (numba calls ctypes functions natively) instead of
  through ffcv's Python wrappers: each wrapper becomes a fresh numba dispatcher per pipeline build,
  and numba's clean-up of discarded ones fails with a KeyError in its finalizer (noise at exit).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.pipeline.compiler import Compiler
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .rng import crop_and_flip, sample_key


@intrinsic
def _load_uint64(typingctx, address):
    """Reads the uint64 stored at an integer address."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(pointer)

    return types.uint64(address), codegen


class _CropResizeDecoder(ResizedCropRGBImageDecoder):
    """Shared decode loop. center_ratio > 0: centre crop of that fraction of the shorter side (ffcv's
    CenterCropRGBImageDecoder); otherwise seeded RandomResizedCrop(scale, ratio) + flip."""

    def __init__(self, output_size: tuple[int, int], *, center_ratio: float = 0.0,
                 scale: tuple[float, float] = (1.0, 1.0), ratio: tuple[float, float] = (1.0, 1.0),
                 flip_prob: float = 0.0) -> None:
        super().__init__(output_size)
        self.center_ratio = float(center_ratio)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.flip_prob = float(flip_prob)
        self._epoch_key = np.zeros(1, dtype=np.uint64)  # must outlive the compiled code

    @property
    def get_crop_generator(self):  # abstract in ffcv's base class; our generate_code does the crop
        return crop_and_flip

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES['jpg']
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        center_ratio = self.center_ratio
        scale_lo, scale_hi = self.scale
        log_ratio_lo, log_ratio_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        flip_prob = self.flip_prob
        key_address = self._epoch_key.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch_key = _load_uint64(key_address)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field['data_ptr'], storage_state)
                height = np.uint32(field['height'])
                width = np.uint32(field['width'])
                if field['mode'] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    ctypes_imdecode(image_data.ctypes.data, image_data.size, height, width,
                                    temp_buffer.ctypes.data, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                if center_ratio > 0:
                    side = np.int64(center_ratio * min(height, width))
                    top, left, h, w, flip = (np.int64(height) - side) // 2, (np.int64(width) - side) // 2, \
                        side, side, False
                else:
                    top, left, h, w, flip = crop_and_flip(height, width, scale_lo, scale_hi, log_ratio_lo,
                                                          log_ratio_hi, flip_prob, sample_key(epoch_key, source_ix))
                out = destination[dst_ix]
                ctypes_resize(0, temp_buffer.ctypes.data, temp_buffer.shape[0], temp_buffer.shape[1],
                              top, top + h, left, left + w, out.ctypes.data, out.shape[0], out.shape[1])
                if flip:  # in place, row by row (each row is contiguous in the HWC output)
                    last = out.shape[1] - 1
                    for y in range(out.shape[0]):
                        for x in range(out.shape[1] // 2):
                            for c in range(3):
                                tmp = out[y, x, c]
                                out[y, x, c] = out[y, last - x, c]
                                out[y, last - x, c] = tmp
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededRandomResizedCropDecoder(_CropResizeDecoder):
    """RandomResizedCrop((size, size), scale, ratio) + horizontal flip with probability flip_prob,
    deterministic given (epoch key, sample index). Call `set_epoch_key` before iterating an epoch."""

    def __init__(self, output_size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                 flip_prob: float) -> None:
        super().__init__(output_size, scale=scale, ratio=ratio, flip_prob=flip_prob)

    def set_epoch_key(self, key: int) -> None:
        self._epoch_key[0] = np.uint64(key)


class CenterCropDecoder(_CropResizeDecoder):
    """ffcv's CenterCropRGBImageDecoder((size, size), ratio=crop_pct): the centred square of
    crop_pct x the shorter side, resized to size."""

    def __init__(self, output_size: tuple[int, int], ratio: float) -> None:
        super().__init__(output_size, center_ratio=ratio)
