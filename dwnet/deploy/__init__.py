"""Deployment export of a trained DWNet: a `torch.export` program (.pt2) and ONNX, each checked
against the PyTorch model before it is written under its final name.

    python -m dwnet.deploy --model dwnet_tiny --checkpoint dwnet_tiny_224.pth --out dwnet_tiny.onnx
"""
from .export import DeployError, DeployReport, deploy, prepare_model

__all__ = ["DeployError", "DeployReport", "deploy", "prepare_model"]
