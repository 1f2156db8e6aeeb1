"""DWNet models, registered in timm's registry on import (`timm.create_model('dwnet_tiny')`)."""
from .checkpoint import (CheckpointMismatchError, load_backbone, load_checkpoint, load_state_dict_checked,
                         read_state_dict)
from .dwnet import DWNet, DWNetBlock, DWNetStage, DepthwiseConvMixer, checkpoint_filter_fn
from .factory import build_model, create_model
from .flops import count_macs, count_parameters
from .fusion import fuse_batchnorm
from .layers import BatchNormFP32, DynamicDepthwiseConv2d

PUBLISHED_MODELS = ("dwnet_tiny", "dynamic_dwnet_tiny", "dwnet_base", "dynamic_dwnet_base")

__all__ = [
    "DWNet", "DWNetBlock", "DWNetStage", "DepthwiseConvMixer", "BatchNormFP32", "DynamicDepthwiseConv2d",
    "CheckpointMismatchError", "load_backbone", "load_checkpoint", "load_state_dict_checked", "read_state_dict",
    "checkpoint_filter_fn",
    "count_macs", "count_parameters", "fuse_batchnorm", "create_model", "build_model", "PUBLISHED_MODELS",
]

