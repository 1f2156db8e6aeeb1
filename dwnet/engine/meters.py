"""What the training loop measures during an epoch: the mean loss (kept on the device: reading a
loss back every step would stall the GPU's queue of work), images/s and the share of time spent
waiting for data, per logging interval and per epoch."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class EpochMeter:
    def __init__(self, device: torch.device, world_size: int) -> None:
        self.world_size = world_size
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)
        self.micro_batches = 0
        self.t_epoch = self.t_log = self.t_data = time.perf_counter()
        self.data_time = 0.0
        self.images_since_log = 0
        self.images = 0

    def data_arrived(self) -> None:
        self.data_time += time.perf_counter() - self.t_data

    def add(self, loss: torch.Tensor, images: int) -> None:
        """One micro-batch's loss (non-finite ones are left out of the mean) and size on this rank."""
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double(), 0.0)
        self.loss_count += finite
        self.micro_batches += 1
        self.images_since_log += images
        self.images += images

    def waiting_for_data(self) -> None:
        self.t_data = time.perf_counter()

    def interval(self) -> tuple[float, float]:
        """(images/s over all ranks, data-time fraction) since the last call, which starts a new interval."""
        now = time.perf_counter()
        elapsed = max(now - self.t_log, 1e-9)
        rates = self.images_since_log * self.world_size / elapsed, self.data_time / elapsed
        self.t_log, self.data_time, self.images_since_log = now, 0.0, 0
        return rates

    def epoch_stats(self) -> dict[str, float]:
        """Collective: the epoch's mean train loss over all ranks, its duration and images/s."""
        loss_sum, loss_count = self.loss_sum, self.loss_count
        if dist.is_initialized():
            packed = torch.stack([loss_sum, loss_count])
            dist.all_reduce(packed)
            loss_sum, loss_count = packed[0], packed[1]
        seconds = time.perf_counter() - self.t_epoch
        return {"train_loss": loss_sum.item() / max(loss_count.item(), 1), "epoch_seconds": seconds,
                "images_per_s": self.images * self.world_size / max(seconds, 1e-9)}
