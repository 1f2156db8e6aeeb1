"""Eval-time folding of every BatchNorm in DWNet into the conv or linear layer next to it.

After fusion a block has no normalisation left in its conv branch or before its MLP, which
removes four memory passes per block at inference. The fused model is for inference only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .dwnet import DepthwiseConvMixer, DWNet, DWNetBlock
from .layers import DynamicDepthwiseConv2d


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(x) == scale * x + shift in eval mode."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_bn_into_following_linear(bn: nn.modules.batchnorm._BatchNorm, linear: nn.Linear) -> None:
    """linear(BN(x)) == linear'(x): W' = W diag(s), b' = b + W t."""
    scale, shift = _bn_scale_shift(bn)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(shift)
    linear.bias = nn.Parameter(bias + linear.weight @ shift)
    linear.weight = nn.Parameter(linear.weight * scale[None, :])


def _fold_bn_into_dynamic_conv(conv: DynamicDepthwiseConv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """BN(dynconv(x)): scale the generated kernels of channel c (rows c*k*k..) and the bias."""
    scale, shift = _bn_scale_shift(bn)
    conv.conv1 = fuse_conv_bn_eval(conv.conv1, conv.bn)
    conv.bn = nn.Identity()
    taps = conv.kernel_size * conv.kernel_size
    row_scale = scale.repeat_interleave(taps)
    conv.conv2.weight = nn.Parameter(conv.conv2.weight * row_scale[:, None, None, None])
    conv.conv2.bias = nn.Parameter(conv.conv2.bias * row_scale)
    conv.bias = nn.Parameter(conv.bias * scale + shift)


def _fuse_mixer(mixer: DepthwiseConvMixer) -> None:
    mixer.conv0 = fuse_conv_bn_eval(mixer.conv0, mixer.bn0)
    if isinstance(mixer.conv, DynamicDepthwiseConv2d):
        _fold_bn_into_dynamic_conv(mixer.conv, mixer.bn)
    else:
        mixer.conv = fuse_conv_bn_eval(mixer.conv, mixer.bn)
    mixer.conv2 = fuse_conv_bn_eval(mixer.conv2, mixer.bn2)
    mixer.bn0, mixer.bn, mixer.bn2 = nn.Identity(), nn.Identity(), nn.Identity()


@torch.no_grad()
def fuse_batchnorm(model: DWNet) -> DWNet:
    """Folds all BatchNorms into neighbouring layers, in place; returns the model (eval mode)."""
    if model.training:
        raise RuntimeError("fuse_batchnorm needs eval mode running statistics: call model.eval() first")
    for module in model.modules():
        if isinstance(module, DWNetBlock):
            _fuse_mixer(module.attn2conv)
            _fold_bn_into_following_linear(module.bn, module.mlp.fc1)
            module.bn = nn.Identity()
    return model
