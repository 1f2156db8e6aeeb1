"""`python -m dwnet.deploy`: ONNX and torch.export files that give PyTorch's outputs, and
one-line errors for bad input."""
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
import torch

import dwnet  # noqa: F401  (registers the models)
from dwnet.deploy.__main__ import main
from dwnet.models import create_model
from dwnet.models.layers import DynamicDepthwiseConv2d

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def batch_dim(path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


def test_dynamic_conv_export_formulation_equals_the_grouped_conv():
    conv = DynamicDepthwiseConv2d(16).eval()
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 16, 9, 11)
    with torch.no_grad():
        expected = conv(x)
        conv.export_friendly = True
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_reference_checkpoint_deploys_fused_with_static_batch(data_dir, tmp_path, capsys):
    out = tmp_path / "femto.onnx"
    rc = main(["--model", "dwnet_femto", "--checkpoint", str(data_dir / "dwnet_e24_d1121_c10.pth"),
               "--out", str(out), "--fuse-bn", "--batch", "3", "--image-size", "64"])
    report = capsys.readouterr().out.strip()
    assert rc == 0 and "\n" not in report
    assert "static 3 batch, BatchNorm fused" in report and report.endswith("OK")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["femto.onnx", "femto.pt2"]  # no temporaries left

    # Independently of the tool's own check: the published reference output.
    io = torch.load(data_dir / "dwnet_e24_d1121_c10_io.pt", weights_only=True)
    assert batch_dim(out).dim_value == 3
    torch.testing.assert_close(run_onnx(out, io["x"]), io["y"], atol=1e-4, rtol=1e-4)
    program = torch.export.load(str(tmp_path / "femto.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(io["x"]), io["y"], atol=1e-4, rtol=1e-4)


def test_fine_tuned_dynamic_model_deploys_with_dynamic_batch(tmp_path, capsys):
    """Classes and input channels come from the checkpoint; per-sample kernels export with a
    dynamic batch."""
    torch.manual_seed(0)
    model = create_model("dynamic_dwnet_nano", num_classes=7, in_chans=1)
    with torch.no_grad():
        model.train()(torch.randn(8, 1, 64, 64) * 2 + 0.5)  # non-trivial BatchNorm statistics
    checkpoint = tmp_path / "pets.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    out = tmp_path / "pets.onnx"
    assert main(["--model", "dynamic_dwnet_nano", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "dynamic batch" in capsys.readouterr().out
    assert batch_dim(out).dim_param and not batch_dim(out).dim_value
    x = torch.randn(5, 1, 64, 64)  # a batch size the tool's own check did not use
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(run_onnx(out, x), expected, atol=1e-4, rtol=1e-4)
        program = torch.export.load(str(tmp_path / "pets.pt2"))
        torch.testing.assert_close(program.module()(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["other_model", "unknown_name", "missing_folder", "out_is_folder",
                                  "not_onnx", "missing_checkpoint"])
def test_bad_input_is_one_line(case, data_dir, tmp_path, capsys):
    checkpoint = str(data_dir / "dwnet_e24_d1121_c10.pth")
    args = {"model": "dwnet_femto", "checkpoint": checkpoint, "out": str(tmp_path / "m.onnx")}
    expected = {
        "other_model": ("model", "dynamic_dwnet_nano", "missing keys: "),
        "unknown_name": ("model", "dwnet_huge", "unknown model 'dwnet_huge'"),
        "missing_folder": ("out", str(tmp_path / "nope" / "m.onnx"), "cannot write there"),
        "out_is_folder": ("out", str(tmp_path), "is a directory"),
        "not_onnx": ("out", str(tmp_path / "m.bin"), "must end in .onnx"),
        "missing_checkpoint": ("checkpoint", str(tmp_path / "none.pth"), "checkpoint file not found"),
    }[case]
    args[expected[0]] = expected[1]
    rc = main([f"--{k}={v}" for k, v in args.items()])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: ") and expected[2] in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a probe or a temporary


def test_module_entry_point_reports_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dwnet.deploy", "--model", "resnet_nope", "--checkpoint",
                           "x.pth", "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: unknown model 'resnet_nope'") and "Traceback" not in proc.stderr


def test_deploy_accepts_only_dwnet_models(tmp_path):
    from dwnet.deploy import DeployError, deploy

    with pytest.raises(DeployError, match="unknown model 'resnet18'; DWNet models: .*dwnet_tiny"):
        deploy("resnet18", "x.pth", str(tmp_path / "m.onnx"))
