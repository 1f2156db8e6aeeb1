"""Building a model by name: from Python (`create_model`) and from a run config (`build_model`)."""
import os
from typing import Optional, Union

import timm
import torch.nn as nn

from .checkpoint import load_checkpoint
from .dwnet import DWNet
from .sync_batchnorm import convert_sync_batchnorm_fp32


def create_model(name: str, checkpoint: Optional[Union[str, os.PathLike]] = None, strict: bool = True,
                 **kwargs) -> DWNet:
    """`timm.create_model(name, **kwargs)`, then loads a released/exported checkpoint if given.

    strict=False loads only the tensors whose name and shape fit (a backbone for fine-tuning).
    An unknown name raises ValueError naming the registered DWNet models.
    """
    if not timm.is_model(name):
        known = ", ".join(timm.list_models("*dwnet*"))
        raise ValueError(f"unknown model {name!r}; registered DWNet models: {known}")
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint, strict=strict)
    return model


def build_model(cfg) -> nn.Module:
    """The model a run trains (`cfg` is a `dwnet.config.RunConfig`): architecture, optional
    pretrained weights, gradient checkpointing and SyncBatchNorm as the config says."""
    from dwnet.config import ConfigError  # config does not import models; keep it that way

    kwargs = {"num_classes": cfg.model.num_classes}
    if cfg.model.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    try:
        model = create_model(cfg.model.name, **kwargs)
    except ValueError as err:
        raise ConfigError(f"model.name: {err}") from err
    if cfg.model.pretrained:
        # pretrained_strict=false: fine-tuning on another label set keeps the new head's init.
        load_checkpoint(model, cfg.model.pretrained, strict=cfg.model.pretrained_strict)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.model.sync_bn:
        model = convert_sync_batchnorm_fp32(model)
    # model.channels_last is applied to the input batches only: activations follow the input's
    # memory format, while parameters stay contiguous as DeepSpeed's flat buffers require.
    return model
