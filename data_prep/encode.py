"""Turning one image file into the bytes of its .beton record, in a worker thread: decode once,
check, resize and encode in one go (the check and the conversion share that one decode).

The pixels and record bytes are ffcv's own: the file's decoded RGB array goes through ffcv's
`RGBImageField.encode` (its resize and JPEG encoder) with a malloc that just captures the bytes;
the writer then places them in the file (`beton_writer.py`).

`--write-mode proportion` JPEG-compresses a random share of the images. ffcv draws that with the
unseeded global numpy generator, so two conversions of one tree differ; here the draw is a hash of
(seed, the file's path relative to the split root), so it does not depend on the worker count,
on the order files are processed, or on other files being added, removed or skipped.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from ffcv.fields import RGBImageField

from dwnet.data.image_io import ImageReadError, load_rgb


@dataclass(frozen=True)
class WriteOptions:
    max_resolution: int | None = 500
    write_mode: str = "proportion"
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    smart_threshold: int = 256 * 256 * 3
    num_workers: int = 1
    seed: int = 0

    def field(self, write_mode: str | None = None) -> RGBImageField:
        return RGBImageField(write_mode=write_mode or self.write_mode, max_resolution=self.max_resolution,
                             smart_threshold=self.smart_threshold, jpeg_quality=self.jpeg_quality,
                             compress_probability=self.compress_probability)


@dataclass
class Encoded:
    """One file's outcome: the record (mode, stored size, bytes) and the original size and note, or
    why the file cannot be used."""
    ok: bool
    width: int = 0                 # of the file as decoded
    height: int = 0
    note: str = ""                 # what was converted ("CMYK->RGB"), "" for a plain RGB file
    mode: int = 0                  # ffcv's IMAGE_MODES: 0 jpg, 1 raw
    stored_width: int = 0
    stored_height: int = 0
    data: bytes = b""
    reason: str = ""
    detail: str = ""


def jpeg_draw(seed: int, key: str) -> float:
    """A uniform number in [0, 1) that is a function of (seed, key) only."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


class Encoder:
    """Callable for the worker threads: (path, key) -> Encoded, `key` being the file's stable name."""

    def __init__(self, options: WriteOptions) -> None:
        self.options = options
        self.fields = {mode: options.field(mode) for mode in ("jpg", "raw")}
        self.field = options.field()

    def __call__(self, task: tuple[str, str]) -> Encoded:
        path, key = task
        try:
            image, note = load_rgb(path, silence_warnings=False)  # write_split silences them for all threads
            pixels = np.asarray(image)
            width, height = image.width, image.height
            del image
        except ImageReadError as err:
            return Encoded(ok=False, reason=err.reason, detail=err.detail)
        except Exception as err:  # noqa: BLE001  one odd file must not take the conversion down
            return Encoded(ok=False, reason="corrupt", detail=f"{type(err).__name__}: {err}")
        field = self.field
        if self.options.write_mode == "proportion":
            jpeg = jpeg_draw(self.options.seed, key) < self.options.compress_probability
            field = self.fields["jpg" if jpeg else "raw"]
        row = np.zeros(1, dtype=field.metadata_type)
        captured: list[np.ndarray] = []

        def malloc(size: int) -> tuple[int, np.ndarray]:
            captured.append(np.empty(size, dtype=np.uint8))
            return 0, captured[-1]

        try:
            field.encode(row, pixels, malloc)
        except Exception as err:  # noqa: BLE001  e.g. an image too large for a JPEG
            return Encoded(ok=False, reason="encode-failed", detail=f"{type(err).__name__}: {err}")
        return Encoded(ok=True, width=width, height=height, note=note, mode=int(row["mode"][0]),
                       stored_width=int(row["width"][0]), stored_height=int(row["height"][0]),
                       data=captured[0].tobytes())
