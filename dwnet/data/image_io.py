"""Reading one image file into 8-bit RGB, the same way for the .beton converter and the ImageFolder
backend, with a short machine-readable reason when a file cannot be used.

Odd-but-readable files are converted, not dropped: grayscale, palette, CMYK, alpha and 16-bit
images become RGB (16-bit values are rescaled to 0-255, which PIL's own convert() would clip).
A file's content decides its format, so a PNG saved under a .JPEG name reads fine (noted).
"""
from __future__ import annotations

import contextlib
import errno
import os
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

# Extensions torchvision's ImageFolder accepts; anything else in a class folder is reported.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".pgm": "PPM",
                ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageReadError(Exception):
    """A file that cannot become an RGB image; `reason` is a short code for reports."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


@contextlib.contextmanager
def pil_warnings_silenced() -> Iterator[None]:
    """Palette-transparency and EXIF warnings are about content that is converted anyway.
    (Warning filters are process-wide and `catch_warnings` is not thread-safe: code decoding in
    threads enters this once around all of them and calls load_rgb(silence_warnings=False).)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_rgb(path: str, *, silence_warnings: bool = True) -> tuple[Image.Image, str]:
    """Fully decodes `path` and returns (RGB image, note). The note is "" for a plain RGB file of
    the expected format, else a short description of what was converted ("CMYK->RGB",
    "PNG data in .jpeg file"). Raises ImageReadError for anything unusable."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageReadError("empty-file", "0 bytes")
        with pil_warnings_silenced() if silence_warnings else contextlib.nullcontext():
            with Image.open(path) as img:
                img.load()  # decode everything now: truncation only shows up here
                image, note = _to_rgb(img, path)
    except ImageReadError:
        raise
    except UnidentifiedImageError as err:
        raise ImageReadError("not-an-image", "content is not a readable image format") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError("too-large", str(err)) from err
    except PermissionError as err:
        raise ImageReadError("permission-denied", err.strerror or "permission denied") from err
    except FileNotFoundError as err:
        raise ImageReadError("missing", "file vanished or is a broken link") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        message = str(err) or type(err).__name__
        lowered = message.lower()
        if isinstance(err, OSError) and err.errno in (errno.EIO,):
            raise ImageReadError("io-error", message) from err
        if "truncated" in lowered or "broken data stream" in lowered or isinstance(err, EOFError):
            raise ImageReadError("truncated", message) from err
        raise ImageReadError("corrupt", message) from err
    return image, note


def _to_rgb(img: Image.Image, path: str) -> tuple[Image.Image, str]:
    notes = []
    expected = _EXT_FORMATS.get(os.path.splitext(path)[1].lower())
    if expected and img.format and img.format != expected:
        notes.append(f"{img.format} data in {os.path.splitext(path)[1]} file")
    if img.width == 0 or img.height == 0:
        raise ImageReadError("corrupt", f"image has size {img.width}x{img.height}")
    mode = img.mode
    if mode == "RGB":
        rgb = img  # load() has read the pixels; leaving the `with` only closes the file (no copy needed)
    elif mode in _HIGH_DEPTH:
        rgb = Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
        notes.append(f"{mode}->RGB (rescaled to 8 bits)")
    else:
        rgb = img.convert("RGBA").convert("RGB") if mode == "P" and "transparency" in img.info \
            else img.convert("RGB")
        notes.append(f"{mode}->RGB")
    return rgb, "; ".join(notes)


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """High-depth gray values to 0-255: 16-bit modes by their full range; 32-bit integer ('I', which
    PIL also uses for many 16-bit PNGs) by the range the data evidently uses; floats in [0, 1] or
    already 0-255."""
    data = values.astype(np.float64)
    top = float(data.max()) if data.size else 0.0
    if mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / top
    return np.clip(np.rint(data * scale), 0, 255).astype(np.uint8)
