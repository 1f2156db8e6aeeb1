"""DWNet and dynamic DWNet (ICLR 2022, "On the Connection between Local Attention and Dynamic
Depth-wise Convolution").

A Swin-T/B layout in which each window-attention block is replaced by a 1x1 conv -> 7x7
depth-wise (static or per-sample dynamic) conv -> 1x1 conv branch, each followed by BatchNorm.
Module and parameter names match the released checkpoints, so those load with strict=True.
Feature maps are NCHW throughout; channels_last memory format makes the per-block permutes for
the token-wise MLP free.
"""
from typing import Optional, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm's own model files import it from here

from .layers import BatchNormFP32, DynamicDepthwiseConv2d, PatchEmbed, PatchMerging

__all__ = ["DWNet", "DWNetBlock", "DepthwiseConvMixer", "DWNetStage", "checkpoint_filter_fn"]


class DepthwiseConvMixer(nn.Module):
    """The spatial branch that replaces window attention (`attn2conv` in released weights)."""

    def __init__(self, dim: int, kernel_size: int = 7, dynamic: bool = False,
                 norm_layer: type[nn.Module] = BatchNormFP32):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn0 = norm_layer(dim)
        if dynamic:
            self.conv = DynamicDepthwiseConv2d(dim, kernel_size, norm_layer=norm_layer)
        else:
            self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.bn = norm_layer(dim)
        self.conv2 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn2 = norm_layer(dim)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.conv0(x)))
        x = self.act(self.bn(self.conv(x)))
        return self.bn2(self.conv2(x))


class DWNetBlock(nn.Module):
    """x + DropPath(DWConv(x)); x + DropPath(MLP(BN(x))). One drop rate for both branches."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, dynamic: bool = False,
                 drop_path: float = 0.0, norm_layer: type[nn.Module] = BatchNormFP32):
        super().__init__()
        # Registration order matches the released checkpoints' key order (attn2conv, mlp, bn).
        self.attn2conv = DepthwiseConvMixer(dim, kernel_size, dynamic, norm_layer)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.bn = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn2conv(x))
        # The MLP is token-wise: run it on NHWC (a view, not a copy, under channels_last).
        mlp_out = self.mlp(self.bn(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.drop_path(mlp_out)


class DWNetStage(nn.Module):
    """`depth` blocks at one resolution, optionally followed by a 2x patch merging."""

    def __init__(self, dim: int, depth: int, drop_path_rates: list[float], downsample: bool,
                 kernel_size: int = 7, mlp_ratio: float = 4.0, dynamic: bool = False,
                 norm_layer: type[nn.Module] = BatchNormFP32):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            DWNetBlock(dim, kernel_size, mlp_ratio, dynamic, drop_path_rates[i], norm_layer)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else nn.Identity()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # Note: recomputation updates BatchNorm running statistics a second time.
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


class DWNet(nn.Module):
    """DWNet / dynamic DWNet image classifier.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 gives a backbone with an identity head.
        embed_dim: channels of the first stage; stage i has embed_dim * 2**i.
        depths: blocks per stage.
        kernel_size: depth-wise kernel ("window") size.
        mlp_ratio: MLP hidden width relative to the stage width.
        dynamic: per-sample dynamic depth-wise kernels instead of static ones.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth at the last block, growing linearly from 0.
        patch_size: stride of the patch embedding.
    Any input size works: the stem and each patch merging pad bottom/right with zeros as needed.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), kernel_size: int = 7, mlp_ratio: float = 4.0,
                 dynamic: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 patch_size: int = 4, global_pool: str = "avg",
                 norm_layer: type[nn.Module] = BatchNormFP32):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"DWNet global_pool={global_pool!r}: use 'avg' or '' (no pooling)")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.dynamic = dynamic
        self.grad_checkpointing = False
        num_stages = self.num_stages = len(depths)
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.layers.append(DWNetStage(
                dims[i], depth, rates[first:first + depth], downsample=i < num_stages - 1,
                kernel_size=kernel_size, mlp_ratio=mlp_ratio, dynamic=dynamic, norm_layer=norm_layer))
            # Stage i's feature map is its blocks' output (stride patch_size * 2**i); the patch
            # merging that ends the stage belongs to the next scale. Hook and FX feature
            # extraction take the named module's output, so name the blocks.
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i,
                                          module=f"layers.{i}.blocks"))
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)  # torch's default eps, as released
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- timm model API ---------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Norms and biases are 1-D and excluded by the optimizer's ndim rule; nothing else is.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"DWNet global_pool={global_pool!r}: use 'avg' or ''")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Stage outputs before each patch merging (strides 4, 8, 16, 32), for dense tasks.

        `indices`: which stages (an int n = the last n). `norm=True` applies the final LayerNorm to
        the last stage's map, as the classifier sees it. `stop_early` runs only up to the last
        stage asked for; the returned final map is then that stage's output (not normalised, as
        the final LayerNorm is sized for the last stage).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NHWC'")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers[:max_index + 1] if (stop_early or intermediates_only) else self.layers
        final_stage = self.num_stages - 1
        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                feat = self.norm(x) if (norm and i == final_stage) else x
                intermediates.append(feat.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feat)
            if i < len(stages) - 1:  # no merging after the last stage run
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) - 1 == final_stage else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops the stages (and optionally norm/head) that `indices` do not need."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-stage map after the last LayerNorm, NCHW (B, num_features, H/32, W/32)."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Accepts `{'model': sd}` (official), `{'module': sd}` (DeepSpeed) or a bare state_dict,
    with or without a DDP `module.` prefix."""
    for key in ("model", "module", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


# ---- registry -------------------------------------------------------------------------------
_RELEASES = "https://github.com/Atten4Vis/DemystifyLocalViT/releases/download/prerelease/"


def _cfg(url: str = "", **overrides) -> dict:
    # The released models were evaluated as the published recipe says: bicubic resize to 256,
    # centre crop 224 (crop_pct 0.875), ImageNet mean/std.
    cfg = dict(
        url=url, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bicubic", fixed_input_size=False, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), first_conv="patch_embed.proj", classifier="head", license="mit",
        paper_ids="arXiv:2106.04263", origin_url="https://github.com/Atten4Vis/DemystifyLocalViT")
    cfg.update(overrides)
    return cfg


def _small_cfg() -> dict:
    # Test / CPU-demo variants: no released weights; 10 classes at 64 px like the reference file.
    return _cfg(num_classes=10, input_size=(3, 64, 64), pool_size=(2, 2))


default_cfgs = generate_default_cfgs({
    "dwnet_tiny.in1k": _cfg(_RELEASES + "dwnet_tiny_224.pth"),
    "dynamic_dwnet_tiny.in1k": _cfg(_RELEASES + "dynamic_dwnet_tiny_224.pth"),
    "dwnet_base.in1k": _cfg(_RELEASES + "dwnet_base_224.pth"),
    "dynamic_dwnet_base.in1k": _cfg(_RELEASES + "dynamic_dwnet_base_224.pth"),
    "dwnet_femto.untrained": _small_cfg(),
    "dwnet_nano.untrained": _small_cfg(),
    "dynamic_dwnet_nano.untrained": _small_cfg(),
})


def _create_dwnet(variant: str, pretrained: bool = False, **kwargs) -> DWNet:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        DWNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


# The four published models (exact sizes in the README's Models table), then small
# variants for tests and CPU runs. Keyword arguments override the architecture defaults.
@register_model
def dwnet_tiny(pretrained: bool = False, **kwargs) -> DWNet:
    """DWNet-T: 96-dim, depths 2-2-6-2, static 7x7 depth-wise convs."""
    arch = dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.2)
    return _create_dwnet("dwnet_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def dynamic_dwnet_tiny(pretrained: bool = False, **kwargs) -> DWNet:
    """Dynamic DWNet-T: as DWNet-T with per-sample generated depth-wise kernels."""
    arch = dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.2, dynamic=True)
    return _create_dwnet("dynamic_dwnet_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def dwnet_base(pretrained: bool = False, **kwargs) -> DWNet:
    """DWNet-B: 128-dim, depths 2-2-18-2."""
    arch = dict(embed_dim=128, depths=(2, 2, 18, 2), drop_path_rate=0.5)
    return _create_dwnet("dwnet_base", pretrained, **dict(arch, **kwargs))


@register_model
def dynamic_dwnet_base(pretrained: bool = False, **kwargs) -> DWNet:
    """Dynamic DWNet-B: as DWNet-B with per-sample generated depth-wise kernels."""
    arch = dict(embed_dim=128, depths=(2, 2, 18, 2), drop_path_rate=0.5, dynamic=True)
    return _create_dwnet("dynamic_dwnet_base", pretrained, **dict(arch, **kwargs))


@register_model
def dwnet_femto(pretrained: bool = False, **kwargs) -> DWNet:
    """24-dim, depths 1-1-2-1: the layout of the reference checkpoint in tests/data/."""
    arch = dict(embed_dim=24, depths=(1, 1, 2, 1), drop_path_rate=0.0)
    return _create_dwnet("dwnet_femto", pretrained, **dict(arch, **kwargs))


@register_model
def dwnet_nano(pretrained: bool = False, **kwargs) -> DWNet:
    """32-dim, depths 1-1-3-1."""
    arch = dict(embed_dim=32, depths=(1, 1, 3, 1), drop_path_rate=0.05)
    return _create_dwnet("dwnet_nano", pretrained, **dict(arch, **kwargs))


@register_model
def dynamic_dwnet_nano(pretrained: bool = False, **kwargs) -> DWNet:
    """32-dim, depths 1-1-3-1, dynamic depth-wise kernels."""
    arch = dict(embed_dim=32, depths=(1, 1, 3, 1), drop_path_rate=0.05, dynamic=True)
    return _create_dwnet("dynamic_dwnet_nano", pretrained, **dict(arch, **kwargs))
