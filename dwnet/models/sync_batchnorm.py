"""SyncBatchNorm with BatchNormFP32's precision contract, for small per-GPU batches.

`nn.SyncBatchNorm.convert_sync_batchnorm` would turn every BatchNormFP32 into a plain SyncBatchNorm,
and DeepSpeed's bf16 cast would then put its running statistics and affine math in bf16, the
precision loss BatchNormFP32 exists to prevent. `convert_sync_batchnorm_fp32` keeps fp32 statistics
and fp32 affine parameters inside the kernels, with bf16 activations in and out.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
# The autograd function behind nn.SyncBatchNorm (stats all-gather, fused backward reduce); its
# kernels take reduced-precision input with fp32 weights, as under autocast.
from torch.nn.modules._functions import SyncBatchNorm as _SyncBatchNormFunction

from .layers import BatchNormFP32


class SyncBatchNormFP32(nn.SyncBatchNorm):
    """nn.SyncBatchNorm whose running statistics stay fp32 under `.bfloat16()` and whose affine
    parameters enter the kernels as fp32; the output has the input's dtype."""

    # BatchNormFP32's bookkeeping and dtype rule, shared as plain functions (neither calls super()).
    update_batch_count = BatchNormFP32.update_batch_count
    keep_statistics_fp32 = BatchNormFP32.keep_statistics_fp32

    def _apply(self, fn, recurse=True):
        # `.bfloat16()` on the whole model must not degrade the running statistics.
        super()._apply(fn, recurse)
        return self.keep_statistics_fp32()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world_size = dist.get_world_size(group) if group is not None else 1
        if not (self.training and world_size > 1):  # nothing to synchronise: BatchNormFP32's kernel
            return BatchNormFP32.forward(self, x)
        momentum = self.update_batch_count()
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return _SyncBatchNormFunction.apply(x, weight, bias, self.running_mean, self.running_var, self.eps, momentum,
                                            group, world_size)


def convert_sync_batchnorm_fp32(module: nn.Module, process_group=None) -> nn.Module:
    """Replaces every BatchNorm2d (BatchNormFP32 included) in `module` by a SyncBatchNormFP32 with
    the same parameters, buffers and mode; returns the (possibly new) root module."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, nn.SyncBatchNorm):
        sync = SyncBatchNormFP32(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                sync.weight = module.weight
                sync.bias = module.bias
        sync.running_mean = module.running_mean
        sync.running_var = module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm_fp32(child, process_group))
    return module
