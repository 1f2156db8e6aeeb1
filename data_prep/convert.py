"""Writing one split into a .beton file: every image decoded once, in worker threads (decode,
check, resize, encode: `encode.py`), the records laid out by one writer in a fixed order
(`beton_writer.py`), the file installed atomically.

The file is written under a temporary name in the output folder and renamed over the final name
only when it is complete, so an interrupted run never leaves a partial `<split>.beton`; the next run
removes the stale temporary file of a run that is gone and starts over.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import glob
import os
import time
from dataclasses import dataclass, field
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from dwnet.atomic_io import install
from dwnet.data.image_io import pil_warnings_silenced
from dwnet.errors import UserError

from .beton_writer import BetonWriter
from .encode import Encoded, Encoder, WriteOptions

__all__ = ["ConvertError", "WriteOptions", "SplitResult", "write_split"]


class ConvertError(UserError):
    """One-line reason the split could not be written."""


@dataclass
class SplitResult:
    path: str
    written: int = 0
    bytes: int = 0
    seconds: float = 0.0
    installed: bool = False
    failed: dict[int, Encoded] = field(default_factory=dict)     # sample index -> why it was skipped
    converted: collections.Counter = field(default_factory=collections.Counter)  # note -> count
    labels: collections.Counter = field(default_factory=collections.Counter)     # label -> written


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
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
        removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def page_size_for(largest: tuple[int, int], max_resolution: int | None) -> int:
    """ffcv stores a sample within one page; pick a power of two that fits the largest raw image
    (ffcv's default 8 MiB is too small for raw images above ~1600x1600), starting from ffcv's minimum
    2 MiB (the last page is padded, so small pages keep small datasets small)."""
    width, height = largest
    if max_resolution and max(width, height) > max_resolution:
        ratio = max_resolution / max(width, height)
        width, height = int(width * ratio), int(height * ratio)
    page = 1 << 21
    while page < 2 * width * height * 3 + (1 << 16):
        page <<= 1
    return page


def write_split(final_path: str, samples: Sequence[tuple[str, int]], keys: Sequence[str], options: WriteOptions,
                *, candidates: Sequence[int] | None = None, want: int = 0, strict: bool = False,
                already_skipped: int = 0, desc: str = "convert") -> SplitResult:
    """Encodes samples [(path, label)] and writes the usable ones to `final_path`, in sample order.

    `keys[i]` names sample i for the seeded JPEG/raw draw (its path relative to the split root).
    `candidates` is the order to try samples in (default: all, in order); with `want` > 0 it stops
    once `want` samples were written, topping up past unusable files. With `strict`, any unusable
    file (or `already_skipped` > 0: files the scan rejected) leaves the split uninstalled.
    Raises ConvertError (one line) if the output cannot be written."""
    order = list(range(len(samples))) if candidates is None else list(candidates)
    want = min(want or len(order), len(order))
    result = SplitResult(final_path)
    if want == 0:
        raise ConvertError(f"{final_path}: no images to write")
    clean_stale(final_path)
    tmp = temp_name(final_path)
    start = time.monotonic()
    try:
        with pil_warnings_silenced(), _encoder_pool(options, want) as encode:
            largest = (options.max_resolution,) * 2 if options.max_resolution else \
                _largest_size([samples[i][0] for i in order])  # top-ups may reach any candidate
            with BetonWriter(tmp, want, page_size_for(largest, options.max_resolution)) as writer:
                bar = tqdm(total=want, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.05)
                position = 0
                while writer.count < want and position < len(order):
                    batch = order[position:position + want - writer.count]
                    position += len(batch)
                    for index, record in zip(batch, encode([(samples[i][0], keys[i]) for i in batch])):
                        if record.ok:
                            writer.add(index, samples[index][1], record)
                            result.labels[samples[index][1]] += 1
                            for note in filter(None, record.note.split("; ")):
                                result.converted[note] += 1
                        else:
                            result.failed[index] = record
                        bar.update(1)
                bar.close()
                result.written = writer.finish()
        result.seconds = time.monotonic() - start
        if result.written == 0 or (strict and (result.failed or already_skipped)):
            _remove(tmp)
            return result
        install(tmp, final_path)  # the only step that makes the file visible under its name (durably)
    except OSError as err:
        _remove(tmp)
        raise ConvertError(f"{final_path}: writing failed ({err.strerror or err}); nothing was installed and the "
                           "temporary file is removed; free space or fix permissions in that folder, or pass another "
                           "--out") from None
    except BaseException:
        _remove(tmp)  # Ctrl-C, errors: never leave the temporary behind
        raise
    result.installed = True
    result.bytes = os.path.getsize(final_path)
    return result


@contextlib.contextmanager
def _encoder_pool(options: WriteOptions, total: int) -> Iterator:
    """A function [(path, key)] -> [Encoded] (in order, lazily) over `options.num_workers` threads.

    Threads, not processes: decoding (PIL), resizing and JPEG encoding (OpenCV) release the GIL, so
    threads run them in parallel, and the records stay in this process. Worker processes would have
    to pickle every record through a pipe to the writer (a raw 500x375 record is 560 kB), which on
    a few cores cost more than the parallel work saved."""
    encoder = Encoder(options)
    if total < 64 or options.num_workers <= 1:
        yield lambda tasks: map(encoder, tasks)
        return
    with concurrent.futures.ThreadPoolExecutor(options.num_workers, thread_name_prefix="encode") as pool:
        def encode(tasks: list) -> Iterator[Encoded]:
            window: collections.deque = collections.deque()
            for task in tasks:  # a bounded window in flight: memory stays flat on any tree size
                window.append(pool.submit(encoder, task))
                if len(window) >= 4 * options.num_workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        yield encode


def _largest_size(paths: list[str]) -> tuple[int, int]:
    """Width and height of the largest image by area, from the file headers (no decoding): the page
    size must be known before the first record is placed. Unreadable files are ignored here."""
    from PIL import Image

    largest = (1, 1)
    for path in paths:
        with contextlib.suppress(Exception):
            with Image.open(path) as image:
                if image.width * image.height > largest[0] * largest[1]:
                    largest = image.size
    return largest


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
