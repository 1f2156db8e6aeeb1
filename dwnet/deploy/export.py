"""Builds the inference model from a checkpoint and writes the .pt2 and .onnx files."""
import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Optional, Union

import timm
import torch

from dwnet.atomic_io import install
from dwnet.models import DWNet, create_model, fuse_batchnorm, load_state_dict_checked, read_state_dict
from dwnet.models.layers import DynamicDepthwiseConv2d

from .verify import max_abs_diff, onnxruntime_outputs, sample_inputs

# The torch.onnx (dynamo) exporter's native opset: every operator DWNet needs (LayerNormalization
# needs 17) and run by every onnxruntime since 1.14, including the current 1.2x/1.3x releases.
ONNX_OPSET = 18
TOLERANCE = 1e-4


class DeployError(RuntimeError):
    """Bad input or a failed check, said in one line."""


@dataclass
class DeployReport:
    model: str
    onnx_path: str
    program_path: str
    batch: str
    fused: bool
    onnx_diff: float
    program_diff: float
    batches_checked: tuple[int, ...]

    def line(self) -> str:
        fused = ", BatchNorm fused" if self.fused else ""
        return (f"{self.model}: wrote {self.onnx_path} (opset {ONNX_OPSET}, {self.batch} batch{fused}) and "
                f"{self.program_path}; max |diff| vs PyTorch over batches {list(self.batches_checked)}: "
                f"onnxruntime {self.onnx_diff:.1e}, torch.export {self.program_diff:.1e} "
                f"(tolerance {TOLERANCE:g}) OK")


def prepare_model(name: str, checkpoint: Union[str, os.PathLike]) -> DWNet:
    """The eval-mode model of `checkpoint`; classes and input channels are read from its tensors,
    so a fine-tuned checkpoint needs no extra flags."""
    dwnets = timm.list_models("*dwnet*")
    if name not in dwnets:  # checked before the checkpoint is read
        raise DeployError(f"unknown model {name!r}; DWNet models: {', '.join(dwnets)}")
    state_dict = read_state_dict(checkpoint)
    head = state_dict.get("head.weight")
    stem = state_dict.get("patch_embed.proj.weight")
    kwargs = dict(num_classes=head.shape[0] if head is not None else 0)
    if stem is not None:
        kwargs["in_chans"] = stem.shape[1]
    model = create_model(name, **kwargs)
    load_state_dict_checked(model, state_dict, str(checkpoint), strict=True)
    return model.eval()


def _for_export(model: DWNet, fuse_bn: bool, dynamic_batch: bool) -> DWNet:
    """A copy fit for export: BatchNorms optionally folded; with a dynamic batch, dynamic convs
    in their formulation without batch-dependent conv groups (same outputs)."""
    model = copy.deepcopy(model).eval()
    if fuse_bn:
        fuse_batchnorm(model)
    for module in model.modules():
        if isinstance(module, DynamicDepthwiseConv2d):
            module.export_friendly = dynamic_batch
    return model


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DeployError(f"--out {path}: is a directory; give a file name ending in .onnx")
    if not path.endswith(".onnx"):
        raise DeployError(f"--out {path}: must end in .onnx (the torch.export program goes next to it as .pt2)")
    try:
        with open(os.path.join(folder, f".{os.path.basename(path)}.probe.{os.getpid()}"), "wb") as fh:
            probe = fh.name
        os.remove(probe)
    except OSError as err:
        raise DeployError(f"--out {path}: cannot write there ({err.strerror}); choose a writable folder") from err


def deploy(name: str, checkpoint: Union[str, os.PathLike], out: str, fuse_bn: bool = False,
           batch: Optional[int] = None, image_size: Optional[int] = None, num_checks: int = 3) -> DeployReport:
    """Writes `out` (.onnx) and the same path with .pt2, after checking both against PyTorch.

    batch=None exports a dynamic batch dimension; an int fixes it. image_size defaults to the
    model's pretrained config (224 for the published models).
    """
    _check_writable(out)
    program_path = out[:-len(".onnx")] + ".pt2"
    model = prepare_model(name, checkpoint)
    size = image_size or model.pretrained_cfg["input_size"][-1]
    inputs = sample_inputs(model.patch_embed.proj.in_channels, size, batch, num_checks)
    with torch.no_grad():
        expected = [model(x) for x in inputs]

    exported = _for_export(model, fuse_bn, dynamic_batch=batch is None)
    example = inputs[-1]  # dynamic: batch 2 or more, so export does not specialise it to 1
    dynamic_shapes = None if batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with torch.no_grad():
        program = torch.export.export(exported, (example,), dynamic_shapes=dynamic_shapes)
    program_diff = max_abs_diff([program.module()(x) for x in inputs], expected)
    _require(program_diff, "torch.export program")

    # Temporary names keep the suffixes: torch.export.save wants ".pt2".
    tmp_program = f"{program_path[:-len('.pt2')]}.tmp{os.getpid()}.pt2"
    tmp_onnx = f"{out[:-len('.onnx')]}.tmp{os.getpid()}.onnx"
    try:
        torch.export.save(program, tmp_program)
        _write_onnx(program, tmp_onnx)
        onnx_diff = max_abs_diff(onnxruntime_outputs(tmp_onnx, inputs), expected)
        _require(onnx_diff, "onnxruntime")
        install(tmp_program, program_path)
        install(tmp_onnx, out)
    finally:
        for tmp in (tmp_program, tmp_onnx):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return DeployReport(name, out, program_path, "dynamic" if batch is None else f"static {batch}",
                        fuse_bn, onnx_diff, program_diff, tuple(x.shape[0] for x in inputs))


def _require(diff: float, what: str) -> None:
    if not diff <= TOLERANCE:  # also catches NaN
        raise DeployError(f"{what} output differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); nothing written")


def _write_onnx(program: torch.export.ExportedProgram, path: str) -> None:
    import onnx  # noqa: F401  (the exporter needs it; fail here with the install hint)

    onnx_program = torch.onnx.export(program, opset_version=ONNX_OPSET, dynamo=True, verbose=False)
    onnx_program.save(path, external_data=False)
