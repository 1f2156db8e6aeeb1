"""Checking a .beton: structure, label histogram, resolution statistics, and decoding a sample of
records both directly (each record's bytes) and through ffcv's Loader (the training path).

ffcv's Reader does not notice a truncated file (numpy reads fewer records without complaint) and
its JPEG decoder ignores errors, so the structure and each sampled record are checked explicitly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import cv2
import numpy as np
from ffcv.types import CURRENT_VERSION

from dwnet.data.beton_check import BetonError, check_structure
from dwnet.data.beton_format import IMAGE, LABEL, metadata_column, read_labels
from dwnet.errors import DataError


class VerifyError(DataError):
    """The file is missing or damaged; the message is one line."""


@dataclass
class VerifyReport:
    lines: list[str]
    num_samples: int
    num_classes: int
    decoded: int


def verify_beton(path: str, decode: int = 256) -> VerifyReport:
    """Validates `path`; decodes `decode` evenly spread records (all when decode <= 0 or >= N)."""
    try:
        layout = check_structure(path, fix="re-run the conversion")
    except BetonError as err:
        raise VerifyError(str(err)) from None
    size, num_samples = layout.size, layout.num_samples

    from ffcv.reader import Reader
    try:
        reader = Reader(path)
    except Exception as err:  # noqa: BLE001
        raise VerifyError(f"{path}: damaged header or field table ({type(err).__name__}: {err})") from None
    names = layout.fields
    table = reader.alloc_table

    image_meta = metadata_column(reader, IMAGE)
    labels = read_labels(reader)
    record_size = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    missing = [i for i, ptr in enumerate(image_meta["data_ptr"].tolist()) if ptr not in record_size]
    if missing:
        raise VerifyError(f"{path}: damaged: {len(missing)} image records have no allocation "
                          f"(first sample {missing[0]}); re-run the conversion")
    if labels.min() < 0:
        raise VerifyError(f"{path}: damaged: negative label {labels.min()}")

    chosen = _choose(num_samples, decode)
    _check_records(path, image_meta, record_size, chosen)
    _decode_with_loader(path, chosen)

    lines = [f"file: {path} ({_human(size)}), ffcv format v{CURRENT_VERSION}, fields: "
             + ", ".join(f"{k} ({v})" for k, v in names.items())]
    lines += _label_lines(labels, path)
    lines += _resolution_lines(image_meta)
    lines.append(f"decoded: {len(chosen)}/{num_samples} records OK (bytes checked one by one, "
                 "then read through ffcv's Loader)")
    return VerifyReport(lines, num_samples, int(np.unique(labels).size), len(chosen))


def _choose(num_samples: int, decode: int) -> np.ndarray:
    if decode <= 0 or decode >= num_samples:
        return np.arange(num_samples)
    return np.unique(np.linspace(0, num_samples - 1, decode).round().astype(np.int64))


def _check_records(path: str, image_meta: np.ndarray, record_size: dict[int, int], chosen: np.ndarray) -> None:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for index in chosen.tolist():
        meta = image_meta[index]
        ptr, width, height = int(meta["data_ptr"]), int(meta["width"]), int(meta["height"])
        blob = data[ptr:ptr + record_size[ptr]]
        if int(meta["mode"]) == 1:  # raw pixels
            ok = blob.size >= width * height * 3
        else:
            image = cv2.imdecode(np.asarray(blob), cv2.IMREAD_COLOR)
            ok = image is not None and image.shape[:2] == (height, width)
        if not ok:
            raise VerifyError(f"{path}: damaged: sample {index} does not decode to its recorded "
                              f"{width}x{height} image; re-run the conversion")


def _decode_with_loader(path: str, chosen: np.ndarray) -> None:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    batch = int(min(64, len(chosen)))
    loader = Loader(path, batch_size=batch, num_workers=1, order=OrderOption.SEQUENTIAL,
                    indices=chosen, drop_last=False, os_cache=True, batches_ahead=1,
                    pipelines={IMAGE: [CenterCropRGBImageDecoder((32, 32), ratio=1.0), ToTensor()],
                               LABEL: [IntDecoder(), ToTensor()]})
    seen = 0
    for images, _ in loader:
        seen += images.shape[0]
    if seen != len(chosen):
        raise VerifyError(f"{path}: ffcv's Loader returned {seen} of {len(chosen)} requested samples")


def _label_lines(labels: np.ndarray, path: str) -> list[str]:
    counts = np.bincount(labels)
    present = counts[counts > 0]
    names = _class_names(path)
    line = (f"samples: {labels.size:,}; classes: {present.size} present (labels {labels.min()}-{labels.max()}); "
            f"per class min {present.min()}, median {int(np.median(present))}, max {present.max()}")
    lines = [line]
    if names is not None:
        absent = [name for name, idx in names.items() if idx >= counts.size or counts[idx] == 0]
        lines.append(f"labels.json: {len(names)} classes" + (f"; {len(absent)} without samples here "
                                                             f"(e.g. {absent[:3]})" if absent else ""))
    return lines


def _class_names(path: str) -> dict[str, int] | None:
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "labels.json")
    try:
        with open(candidate) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _resolution_lines(image_meta: np.ndarray) -> list[str]:
    widths, heights = image_meta["width"].astype(np.int64), image_meta["height"].astype(np.int64)
    jpg = int((image_meta["mode"] == 0).sum())

    def stats(values: np.ndarray) -> str:
        return f"min {values.min()}, median {int(np.median(values))}, max {values.max()}"

    return [f"width: {stats(widths)}; height: {stats(heights)}",
            f"stored: {jpg:,} jpg, {widths.size - jpg:,} raw"]


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TB"
