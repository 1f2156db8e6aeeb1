"""Writing one split's checked images into a .beton file, atomically.

The file is written under a temporary name in the output folder and renamed over the final name
only when ffcv's writer has finished, so an interrupted run never leaves a partial `<split>.beton`;
the next run removes the stale temporary file of a run that is gone and starts over.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import time
from dataclasses import dataclass, field

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter

from dwnet.atomic_io import install
from dwnet.data.image_io import ImageReadError, load_rgb


@dataclass
class WriteOptions:
    max_resolution: int | None = 500
    write_mode: str = "proportion"
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    smart_threshold: int = 256 * 256 * 3
    num_workers: int = 1


@dataclass
class WriteResult:
    path: str
    samples: int
    seconds: float
    bytes: int
    late_failures: list[tuple[str, str]] = field(default_factory=list)


class ConvertError(Exception):
    """One-line reason the split could not be written."""


class _CheckedImages:
    """The indexable dataset ffcv's writer workers read: (uint8 HxWx3 array, label) per sample.

    Files were decoded once already; if one changed since then, the worker must not raise (ffcv's
    writer would wait forever for the dead worker), so it stores a gray placeholder and records the
    file in `failures_path`; the caller then refuses to install the .beton."""

    def __init__(self, samples: list[tuple[str, int]], failures_path: str) -> None:
        self.samples = samples
        self.failures_path = failures_path

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        try:
            image, _ = load_rgb(path)
            return np.asarray(image, dtype=np.uint8), label
        except Exception as err:  # noqa: BLE001  (see class docstring)
            reason = err.reason if isinstance(err, ImageReadError) else "corrupt"
            with open(self.failures_path, "a") as fh:  # one short append per failure: atomic enough
                fh.write(f"{path}\t{reason}: changed after it was checked\n")
            return np.full((8, 8, 3), 128, dtype=np.uint8), label


def temp_name(final_path: str) -> str:
    folder, name = os.path.split(final_path)
    return os.path.join(folder, f".{name}.tmp.{os.getpid()}")


def clean_stale(final_path: str) -> list[str]:
    """Removes temporary files of earlier, dead runs for this output; refuses if a live process
    is writing the same output. Returns what was removed."""
    folder, name = os.path.split(final_path)
    removed = []
    for stale in glob.glob(os.path.join(folder, f".{name}.tmp.*")):
        pid_text = stale.rsplit(".tmp.", 1)[1].split(".", 1)[0]
        pid = int(pid_text) if pid_text.isdigit() else -1
        if pid > 0 and pid != os.getpid() and _alive(pid):
            raise ConvertError(f"{final_path}: another conversion (pid {pid}) is writing it right now; "
                               "wait for it or stop it, then rerun")
        if stale.endswith(".shm"):
            _unlink_shared_memory(stale)
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
        removed.append(stale)
    return removed


def _unlink_shared_memory(note: str) -> None:
    """ffcv's writer keeps its metadata table in POSIX shared memory; a killed run leaks it (it lives
    in /dev/shm until reboot). The run noted the segment's name next to its temporary file."""
    from multiprocessing import shared_memory

    try:
        with open(note) as fh:
            name = fh.read().strip()
        if name:
            segment = shared_memory.SharedMemory(name=name)
            segment.close()
            segment.unlink()
    except (OSError, ValueError):
        pass


class _Writer(DatasetWriter):
    """ffcv's DatasetWriter, recording the name of its shared-memory segment in `shm_note`."""

    def __init__(self, *args, shm_note: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shm_note = shm_note

    def prepare(self) -> None:
        super().prepare()
        with open(self.shm_note + ".part", "w") as fh:
            fh.write(self.metadata_sm.name)
        os.replace(self.shm_note + ".part", self.shm_note)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def page_size_for(sizes: list[tuple[int, int]], max_resolution: int | None) -> int:
    """ffcv stores a sample within one page; pick a power of two that fits the largest raw image
    (ffcv's default 8 MiB is too small for raw images above ~1600x1600), starting from ffcv's minimum
    2 MiB (each writer process pads its last page, so small pages keep small datasets small)."""
    largest = 0
    for width, height in sizes:
        if max_resolution and max(width, height) > max_resolution:
            ratio = max_resolution / max(width, height)
            width, height = int(width * ratio), int(height * ratio)
        largest = max(largest, width * height * 3)
    page = 1 << 21
    while page < 2 * largest + (1 << 16):
        page <<= 1
    return page


def write_beton(final_path: str, samples: list[tuple[str, int]], sizes: list[tuple[int, int]],
                options: WriteOptions, desc: str) -> WriteResult:
    """Writes samples [(path, label)] to final_path via a temporary file; raises ConvertError."""
    if not samples:
        raise ConvertError(f"{final_path}: no usable images left to write")
    clean_stale(final_path)
    tmp = temp_name(final_path)
    failures = tmp + ".failures"
    fields = {
        "image": RGBImageField(write_mode=options.write_mode, max_resolution=options.max_resolution,
                               smart_threshold=options.smart_threshold, jpeg_quality=options.jpeg_quality,
                               compress_probability=options.compress_probability),
        "label": IntField(),
    }
    start = time.monotonic()
    try:
        writer = _Writer(tmp, fields, page_size=page_size_for(sizes, options.max_resolution),
                         num_workers=max(1, options.num_workers), shm_note=tmp + ".shm")
        with _labelled_progress(desc):
            writer.from_indexed_dataset(_CheckedImages(samples, failures), chunksize=32)
        late = _read_failures(failures)
        if late:
            raise _LateFailures(late)
        install(tmp, final_path)  # the only step that makes the file visible under its name (durably)
    except _LateFailures as err:
        _remove(tmp, failures, tmp + ".shm")
        return WriteResult(final_path, 0, time.monotonic() - start, 0, late_failures=err.failures)
    except BaseException:
        _remove(tmp, failures, tmp + ".shm")  # Ctrl-C, errors: never leave the temporary behind
        raise
    _remove(failures, tmp + ".shm")
    return WriteResult(final_path, len(samples), time.monotonic() - start, os.path.getsize(final_path))


class _LateFailures(Exception):
    def __init__(self, failures: list[tuple[str, str]]) -> None:
        self.failures = failures


def _read_failures(path: str) -> list[tuple[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [tuple(line.rstrip("\n").split("\t", 1)) for line in fh if line.strip()]


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def _labelled_progress(desc: str):
    """ffcv's writer draws a bare tqdm bar; give it a label and units so the user sees
    '<desc>: 40%|... 1234/3000 [00:10<00:14, 120img/s]'."""
    import ffcv.writer as ffcv_writer

    original = ffcv_writer.tqdm
    ffcv_writer.tqdm = functools.partial(original, desc=desc, unit="img", dynamic_ncols=True,
                                         smoothing=0.05)
    try:
        yield
    finally:
        ffcv_writer.tqdm = original
