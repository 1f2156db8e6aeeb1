"""torchvision ImageFolder readers with the same interface, sharding and per-sample randomness as
the ffcv ones (for comparison and for data without a .beton): PIL decode, RandomResizedCrop
(bicubic) + flip drawn from the same per-sample streams as the ffcv decoder, or Resize(size /
crop_pct, bicubic) + CenterCrop for eval, in DataLoader worker processes; uint8 batches to the device.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode

from dwnet.errors import DataError

from .image_io import ImageReadError, load_rgb
from .readers import Batches
from .rng import crop_and_flip, sample_key


# An image that cannot be read is reported by the worker as a message next to a placeholder
# image, and raised by the main process as a one-line DataError naming the file: an exception
# raised inside a DataLoader worker reaches the user as "Caught RuntimeError in DataLoader worker
# process 0" with the file buried in a re-printed traceback.
_OK = ""


def _load(path: str):
    return load_rgb(path)[0]


def _unreadable(path: str, err: Exception) -> str:
    reason, detail = (err.reason, err.detail) if isinstance(err, ImageReadError) else ("corrupt", str(err))
    return (f"{path}: unreadable image ({reason}: {detail}); remove or replace the file, or convert the tree "
            "with `python -m data_prep convert`, which skips and lists bad files")


def _raise_unreadable(messages: Sequence[str]) -> None:
    bad = [message for message in messages if message]
    if bad:
        raise DataError(bad[0] + (f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""))


def open_image_folder(path: str, split: str) -> ImageFolder:
    if not path or not os.path.isdir(path):
        raise DataError(f"data.{split}_path={path!r}: not a directory; the imagefolder backend "
                        "needs an ImageFolder tree (<root>/<class>/<image>)")
    try:
        return ImageFolder(path, loader=_load)
    except (FileNotFoundError, PermissionError) as err:  # no class folders / no images / unreadable root
        raise DataError(f"data.{split}_path={path}: {err}; the imagefolder backend needs an ImageFolder tree "
                        "(<root>/<class>/<image>)") from None


class _TrainSamples(Dataset):
    """Items are (dataset index, epoch key): the crop/flip stream is the sample's own, so results do
    not depend on which worker decodes it or where an epoch was resumed."""

    def __init__(self, folder: ImageFolder, image_size: int, scale, ratio, hflip: float) -> None:
        self.folder = folder
        self.size = image_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip = float(hflip)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        index, epoch_key = item
        path, label = self.folder.samples[index]
        try:
            image = self.folder.loader(path)
        except Exception as err:  # noqa: BLE001  reported by the main process (see _unreadable)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label, _unreadable(path, err)
        key = np.uint64(sample_key(np.uint64(epoch_key), np.uint64(index)))
        top, left, h, w, flip = crop_and_flip(image.height, image.width, *self.scale, *self.log_ratio,
                                              self.hflip, key)
        image = TF.resized_crop(image, int(top), int(left), int(h), int(w), [self.size, self.size],
                                interpolation=InterpolationMode.BICUBIC, antialias=True)
        if flip:
            image = TF.horizontal_flip(image)
        return TF.pil_to_tensor(image), label, _OK


class _ValSamples(Dataset):
    def __init__(self, folder: ImageFolder, image_size: int, crop_pct: float) -> None:
        self.folder = folder
        self.size = image_size
        self.resize = math.floor(image_size / crop_pct)  # timm's eval transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.folder.samples[index]
        try:
            image = self.folder.loader(path)
        except Exception as err:  # noqa: BLE001  reported by the main process (see _unreadable)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label, _unreadable(path, err)
        image = TF.resize(image, self.resize, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return TF.pil_to_tensor(TF.center_crop(image, [self.size, self.size])), label, _OK


def _to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, problems = batch
    _raise_unreadable(problems)
    non_blocking = device.type == "cuda"
    return images.to(device, non_blocking=non_blocking), labels.to(device, non_blocking=non_blocking)


def _loader(dataset: Dataset, batches: list, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda",
                      multiprocessing_context="fork" if num_workers > 0 else None)


class ImageFolderTrainReader:
    def __init__(self, path: str, *, image_size: int, scale, ratio, hflip: float, batch_size: int,
                 num_workers: int, device: torch.device) -> None:
        self.folder = open_image_folder(path, "train")
        self.dataset = _TrainSamples(self.folder, image_size, scale, ratio, hflip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        crop_and_flip(8, 8, 0.5, 1.0, 0.0, 0.1, 0.5, np.uint64(1))  # compile before workers fork

    def __len__(self) -> int:
        return len(self.folder)

    def batches(self, indices: np.ndarray, epoch_key: int) -> Batches:
        items = [(int(i), epoch_key) for i in indices]
        batches = [items[start:start + self.batch_size] for start in range(0, len(items), self.batch_size)]
        if not batches:
            return
        for batch in _loader(self.dataset, batches, self.num_workers, self.device):
            yield _to_device(batch, self.device)


class ImageFolderValReader:
    """Reads `folder` (from `open_image_folder`: the caller needs its size for the sharding first,
    and a second scan of the tree would be wasted)."""

    def __init__(self, folder: ImageFolder, *, image_size: int, crop_pct: float, batch_size: int, num_workers: int,
                 device: torch.device, indices: np.ndarray) -> None:
        self.folder = folder
        self.dataset = _ValSamples(self.folder, image_size, crop_pct)
        items = [int(i) for i in indices]
        self.batch_list = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
        self.num_workers = num_workers
        self.device = device

    def __len__(self) -> int:
        return len(self.batch_list)

    def batches(self) -> Batches:
        for batch in _loader(self.dataset, self.batch_list, self.num_workers, self.device):
            yield _to_device(batch, self.device)
