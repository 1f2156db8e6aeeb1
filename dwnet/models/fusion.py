"""Eval-time folding of every BatchNorm in DWNet into the conv or linear layer next to it.

After fusion a block has no normalisation left in its conv branch or before its MLP, which
removes four memory passes per block at inference. The fused model is for inference only.

Each block is then replaced by a `FusedDWNetBlock` that, on CPU in fp32 without autograd, also
runs its activations and residual adds inside oneDNN's conv / linear kernels (post-ops): BN
folding alone removes only the BatchNorm passes (~12% of CPU time), while ReLU, GELU, the bias
broadcast and the two residual adds cost about three times that. Same outputs to float rounding;
anywhere else (CUDA, bf16, autograd) the block runs the plain eager ops.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .dwnet import DepthwiseConvMixer, DWNet, DWNetBlock
from .layers import DynamicDepthwiseConv2d

_onednn_verdict: bool | None = None


def onednn_pointwise_available() -> bool:
    """Whether this torch build runs the private oneDNN post-op kernels with the signatures used
    below and gets the eager result. Probed once: a signature change in a future torch release
    then costs speed (eager fallback), never a wrong answer or an exception at inference."""
    global _onednn_verdict
    if _onednn_verdict is None:
        _onednn_verdict = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            try:
                with torch.no_grad():
                    gen = torch.Generator().manual_seed(0)
                    conv, fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 8)
                    x = torch.randn(1, 4, 5, 5, generator=gen)
                    tokens = torch.randn(1, 5, 5, 4, generator=gen)
                    ok = torch.allclose(_conv(conv, x, "relu"), torch.relu(conv(x)), atol=1e-5) \
                        and torch.allclose(_conv(conv, x, other=x), conv(x) + x, atol=1e-5)
                    fused = torch.ops.mkldnn._linear_pointwise(tokens, fc.weight, fc.bias, "gelu", [], "none")
                    _onednn_verdict = ok and torch.allclose(fused, nn.functional.gelu(fc(tokens)), atol=1e-5)
            except Exception:  # noqa: BLE001 - any failure of a private op means: do not use it
                _onednn_verdict = False
    return _onednn_verdict


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


def _conv(conv: nn.Conv2d, x: torch.Tensor, attr: str = "none", other: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x) followed by oneDNN post-op `attr` (relu) or, with `other`, conv(x) + other."""
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if other is None:
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *geometry, attr, [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, other, conv.weight, conv.bias, *geometry, "add", None, None, [], None)


class FusedDWNetBlock(nn.Module):
    """A DWNetBlock after BN folding (inference only): x + mixer(x), then x + MLP(x).

    Keeps the block's submodules (same parameter names); DropPath is the identity in eval mode.
    """

    def __init__(self, block: DWNetBlock):
        super().__init__()
        self.attn2conv = block.attn2conv
        self.mlp = block.mlp
        self.train(block.training)
        mixer, mlp = self.attn2conv, self.mlp
        # The oneDNN path hard-codes this block's layout: ReLU mixer, exact-GELU MLP, no dropout.
        self.onednn_ok = onednn_pointwise_available() and all((
            isinstance(mixer.act, nn.ReLU), isinstance(mixer.conv0, nn.Conv2d), isinstance(mixer.conv2, nn.Conv2d),
            isinstance(mixer.conv, (nn.Conv2d, DynamicDepthwiseConv2d)),
            all(c.padding_mode == "zeros" and not isinstance(c.padding, str)
                for c in (mixer.conv0, mixer.conv, mixer.conv2) if isinstance(c, nn.Conv2d)),
            isinstance(mlp.fc1, nn.Linear), isinstance(mlp.fc2, nn.Linear),
            isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none", isinstance(mlp.norm, nn.Identity),
            mlp.drop1.p == 0 and mlp.drop2.p == 0,
        ))

    def _use_onednn(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_scripting():
            # Inductor lowers these ops only for frozen weights and fuses the eager ops itself;
            # an exported program (ONNX, .pt2) must hold portable ops only.
            return False
        return (self.onednn_ok and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_grad_enabled() and torch.backends.mkldnn.enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_onednn(x):
            x = x + self.attn2conv(x)
            return x + self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        mixer, mlp = self.attn2conv, self.mlp
        y = _conv(mixer.conv0, x, "relu")
        if isinstance(mixer.conv, nn.Conv2d):
            y = _conv(mixer.conv, y, "relu")
        else:  # per-sample kernels: plain grouped conv, then ReLU
            y = mixer.act(mixer.conv(y))
        x = _conv(mixer.conv2, y, other=x)
        tokens = x.permute(0, 2, 3, 1)  # NHWC; a view under channels_last
        hidden = torch.ops.mkldnn._linear_pointwise(tokens, mlp.fc1.weight, mlp.fc1.bias, "gelu", [], "none")
        out = torch.ops.mkldnn._linear_pointwise.binary(hidden, tokens, mlp.fc2.weight, mlp.fc2.bias, "add")
        return out.permute(0, 3, 1, 2)


@torch.no_grad()
def fuse_batchnorm(model: DWNet) -> DWNet:
    """Folds all BatchNorms into neighbouring layers, in place; returns the model (eval mode).

    Each DWNetBlock becomes a FusedDWNetBlock (same parameter names, oneDNN post-ops on CPU).
    """
    if model.training:
        raise RuntimeError("fuse_batchnorm needs eval mode running statistics: call model.eval() first")
    for module in list(model.modules()):
        if isinstance(module, DWNetBlock):
            _fuse_mixer(module.attn2conv)
            _fold_bn_into_following_linear(module.bn, module.mlp.fc1)
            module.bn = nn.Identity()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DWNetBlock):
                setattr(parent, name, FusedDWNetBlock(child))
    return model
