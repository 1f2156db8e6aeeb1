"""Building blocks of DWNet that are not specific to one architecture file.

No `from __future__ import annotations` here or in dwnet.py: TorchScript and FX-generated code
must see real annotations, not strings.
"""
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, register_notrace_function

__all__ = ["BatchNormFP32", "DynamicDepthwiseConv2d", "PatchEmbed", "PatchMerging", "pad_to_multiple"]


class BatchNormFP32(nn.BatchNorm2d):
    """BatchNorm2d whose statistics, affine parameters and arithmetic stay in fp32 whatever the
    activation dtype; the output has the input's dtype.

    DWNet has four BatchNorms per block. Under bf16 training the running statistics would lose
    precision quickly, so they stay fp32 even when the whole model is cast. The normalisation is
    one mixed-precision kernel (bf16 in, fp32 statistics and accumulation, bf16 out; CPU and CUDA)
    rather than an fp32 copy of the activation and a cast back: the tensor is read and written
    once, in bf16, which is what matters on a GPU where BatchNorm is bound by memory traffic.
    The state_dict is that of nn.BatchNorm2d, so checkpoints are interchangeable.
    The forward has no branch on the input's dtype and no `super()` call, so TorchScript, FX and
    torch.compile(fullgraph=True) all take it as it is.
    """

    def _apply(self, fn, recurse=True):
        # `.bfloat16()` / `.half()` on the whole model must not degrade the running statistics.
        super()._apply(fn, recurse)
        return self.keep_statistics_fp32()

    def keep_statistics_fp32(self):
        """Puts the running statistics back in fp32 after a dtype cast; returns the module."""
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = self.update_batch_count()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        weight: Optional[torch.Tensor] = None if self.weight is None else self.weight.float()
        bias: Optional[torch.Tensor] = None if self.bias is None else self.bias.float()
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            weight, bias, use_batch_stats, momentum, self.eps)

    def update_batch_count(self) -> float:
        """nn.BatchNorm2d's bookkeeping for one training forward: counts the batch and returns the
        running-average factor (cumulative when momentum is None)."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
        return momentum


@register_notrace_function  # shape arithmetic decides whether to pad: a leaf for timm's FX tracer
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pads the bottom/right of an NCHW map so both sides divide `multiple`."""
    h, w = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


# Plain `torch.fx.symbolic_trace` (no timm tracer) keeps it a leaf too.
torch.fx.wrap("pad_to_multiple")


class DynamicDepthwiseConv2d(nn.Module):
    """Depth-wise conv whose k x k kernel per channel is generated per sample.

    The kernel comes from the globally pooled input: 1x1 conv C -> C/r, BN, ReLU, 1x1 conv
    C/r -> k*k*C; it is applied depth-wise with zero padding, then a learned per-channel bias is
    added. The generated tensor is laid out channel-major, (C, k, k) per sample.

    Two equal formulations: one grouped conv over the batch folded into channels (fast, lean;
    its `groups` depends on the batch size) and, with `export_friendly=True`, an unfold
    (im2col) and a weighted sum over the k*k taps, whose graph has no batch-dependent attribute,
    as ONNX (static `group`) with a dynamic batch needs. The latter holds k*k copies of the input.
    """

    def __init__(self, dim: int, kernel_size: int = 7, reduction: int = 4,
                 norm_layer: type[nn.Module] = BatchNormFP32):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.export_friendly = False
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
        kernels = self.generate_kernels(x)
        b, c, h, w = x.shape
        k = self.kernel_size
        if self.export_friendly:
            taps = F.unfold(x, k, padding=k // 2).reshape(b, c, k * k, h * w)
            out = (taps * kernels.reshape(b, c, k * k, 1)).sum(dim=2).reshape(b, c, h, w)
            return out + self.bias.reshape(1, -1, 1, 1)
        # One grouped conv over the batch folded into channels applies each sample's kernels.
        out = F.conv2d(x.reshape(1, b * c, h, w), kernels, self.bias.repeat(b), padding=k // 2, groups=b * c)
        return out.reshape(b, c, h, w)


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv to `dim` channels, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        # torch's LayerNorm eps (the released weights' norm), not LayerNorm2d's default 1e-6.
        self.norm = LayerNorm2d(dim, eps=1e-5)

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
