"""Building blocks of DWNet that are not specific to one architecture file."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNormFP32(nn.BatchNorm2d):
    """BatchNorm2d whose statistics, affine parameters and arithmetic stay in fp32 whatever the
    activation dtype; the output has the input's dtype.

    DWNet has four BatchNorms per block. Under bf16 training the running statistics would lose
    precision quickly, so they stay fp32 even when the whole model is cast. The normalisation is
    one mixed-precision kernel (bf16 in, fp32 statistics and accumulation, bf16 out) rather than
    an fp32 copy of the activation and a cast back: the tensor is read and written once, in bf16,
    which is what matters on a GPU where BatchNorm is bound by memory traffic.
    The state_dict is that of nn.BatchNorm2d, so checkpoints are interchangeable.
    """

    def _apply(self, fn, recurse=True):
        # `.bfloat16()` / `.half()` on the whole model must not degrade the running statistics.
        super()._apply(fn, recurse)
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias,
                            self.training or not self.track_running_stats, self._momentum(), self.eps)

    def _momentum(self) -> float:
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum


class DynamicDepthwiseConv2d(nn.Module):
    """Depth-wise conv whose k x k kernel per channel is generated per sample.

    The kernel comes from the globally pooled input: 1x1 conv C -> C/r, BN, ReLU, 1x1 conv
    C/r -> k*k*C; it is applied depth-wise with zero padding, then a learned per-channel bias is
    added. The generated tensor is laid out channel-major, (C, k, k) per sample.
    """

    def __init__(self, dim: int, kernel_size: int = 7, reduction: int = 4,
                 norm_layer: type[nn.Module] = BatchNormFP32):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        # Registration order matches the released checkpoints' key order.
        self.bias = nn.Parameter(torch.zeros(dim))
        self.conv1 = nn.Conv2d(dim, dim // reduction, 1, bias=False)
        self.bn = norm_layer(dim // reduction)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim // reduction, kernel_size * kernel_size * dim, 1)

    def generate_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels, shape (B * C, 1, k, k)."""
        pooled = x.mean(dim=(2, 3), keepdim=True)
        kernels = self.conv2(self.act(self.bn(self.conv1(pooled))))
        return kernels.reshape(-1, 1, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        kernels = self.generate_kernels(x)
        # One grouped conv over the batch folded into channels applies each sample's kernels.
        out = F.conv2d(x.reshape(1, b * c, h, w), kernels, self.bias.repeat(b),
                       padding=self.kernel_size // 2, groups=b * c)
        return out.reshape(b, c, h, w)


class ChannelsLastLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW map (the Swin token LayerNorm, in NCHW)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pads the bottom/right of an NCHW map so both sides divide `multiple`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv to `dim` channels, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = ChannelsLastLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pad_to_multiple(x, self.patch_size)))


class PatchMerging(nn.Module):
    """Swin patch merging: 2x2 neighbours concatenated on channels, LayerNorm(4C), Linear to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        # Registration order matches the released checkpoints' key order.
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 2)
        # Sub-grid order (row, col) = (0,0), (1,0), (0,1), (1,1), as in the released weights.
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2],
                       x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        x = self.reduction(self.norm(x.permute(0, 2, 3, 1)))
        return x.permute(0, 3, 1, 2)
