"""The CUDA path: what only a GPU can exercise, with a CPU twin wherever the property is not CUDA-only.

Tests marked `gpu` need a CUDA device and DeepSpeed's CUDA accelerator; `bench/gpu_check.sh` runs
them (DWNET_GPU_TESTS=1) on a GPU machine, and they are skipped everywhere else.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import timm
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import engine_worker  # noqa: E402
from engine_worker import weights  # noqa: E402
from tensor_loaders import TensorTrainLoader, TensorValLoader, synthetic_dataset  # noqa: E402

import dwnet.models  # noqa: E402,F401
from dwnet.models import BatchNormFP32, fuse_batchnorm  # noqa: E402
from dwnet.models.sync_batchnorm import SyncBatchNormFP32, convert_sync_batchnorm_fp32  # noqa: E402

CUDA_READY = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device (bench/gpu_check.sh)")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU_MARKS)]


def gpu(test):
    for mark in GPU_MARKS:
        test = mark(test)
    return test


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


# ---- BatchNorm precision ---------------------------------------------------------------------
def _cast_reference_batchnorm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """What BatchNormFP32 promises: the same as an fp32 BatchNorm on an fp32 copy, cast back."""
    return nn.functional.batch_norm(x.float(), bn.running_mean, bn.running_var, bn.weight.float(),
                                    bn.bias.float(), True, bn.momentum, bn.eps).to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [BatchNormFP32, SyncBatchNormFP32])
def test_bf16_batchnorm_keeps_fp32_statistics(device, layer):
    torch.manual_seed(0)
    bn = layer(16).to(device).bfloat16().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(bn)
    x = (torch.randn(8, 16, 12, 12, device=device) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = bn(x)
    want = _cast_reference_batchnorm(reference, x.detach())
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    assert relative_error(out, want) < 1e-2
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    out.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and bn.weight.grad.dtype == torch.bfloat16


def test_sync_batchnorm_conversion_keeps_weights_and_precision():
    model = timm.create_model("dwnet_femto", num_classes=10).train()
    synced = convert_sync_batchnorm_fp32(copy.deepcopy(model))
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, SyncBatchNormFP32) for m in norms)
    assert synced.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(synced.state_dict()[key], value), key
    synced.bfloat16()
    assert all(m.running_var.dtype == torch.float32 for m in norms)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(synced(x.bfloat16()), model.bfloat16()(x.bfloat16()))


# ---- engine on one device ------------------------------------------------------------------------
class DeviceLoader:
    """Moves a tensor loader's batches to `device`, as the real loaders deliver them."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start_step: int = 0, *, layout=None):
        for images, labels in self.loader.epoch(epoch, start_step, layout=layout):
            yield images.to(self.device), labels.to(self.device)

    def __iter__(self):
        for images, labels in self.loader:
            yield images.to(self.device), labels.to(self.device)


def cuda_trainer(run_dir, *overrides, poison=None, n: int = 128):
    from dwnet.engine import Trainer

    cfg = engine_worker.tiny_run_config(str(run_dir), "model.channels_last=true", *overrides)
    images, labels = synthetic_dataset(n)
    device = torch.device("cuda", torch.cuda.current_device())
    train = DeviceLoader(TensorTrainLoader(images, labels, cfg.data.batch_size, seed=cfg.engine.seed, poison=poison),
                         device)
    val = DeviceLoader(TensorValLoader(images[:64], labels[:64], 32), device)
    return Trainer(cfg, 0, 1, device, train_loader=train, val_loader=val)


@gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_engine_trains_on_cuda(process_group, tmp_path, zero_stage, precision):
    trainer = cuda_trainer(tmp_path, f"engine.zero_stage={zero_stage}", f"engine.precision={precision}",
                           "optim.epochs=2")
    before = weights(trainer)
    final = trainer.fit()
    after = weights(trainer)
    assert trainer.guard.total_skipped == 0
    assert trainer.progress.step == 2 * trainer.steps_per_epoch
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in before if "weight" in k and not torch.equal(before[k], after[k])]
    assert len(changed) > 10, "the optimizer did not update the weights"
    bn_stats = [v for k, v in trainer.engine.module.state_dict().items() if k.endswith("running_var")]
    assert bn_stats and all(v.dtype == torch.float32 for v in bn_stats)
    assert final["val_top1"] >= 0 and final["val_loss"] == final["val_loss"]


@gpu
def test_captured_step_matches_the_eager_one_on_cuda(process_group, tmp_path):
    """model.compile_mode=reduce-overhead replays forward and backward as CUDA graphs: the first
    steps' losses and the weights after them are the eager engine's within bf16 tolerance."""
    results = {}
    for name, extra in [("eager", []), ("captured", ["model.compile=true", "model.compile_mode=reduce-overhead"])]:
        trainer = cuda_trainer(tmp_path / name, "engine.precision=bf16", "engine.zero_stage=0", *extra)
        assert trainer.captured == (name == "captured")
        losses = []
        for step, (images, labels) in enumerate(trainer.train_loader.epoch(0, layout=trainer.layout)):
            if step == 6:
                break
            losses.append(trainer.micro_step(images, labels, micro_batch=0).item())
            trainer.finish_step()
        results[name] = torch.tensor(losses), weights(trainer)
    (eager_losses, eager_weights), (losses, captured_weights) = results["eager"], results["captured"]
    torch.testing.assert_close(losses, eager_losses, atol=0.05, rtol=0.02)
    for key, value in eager_weights.items():
        if key.endswith("weight"):
            assert relative_error(captured_weights[key], value) < 0.05, key


@gpu
@pytest.mark.parametrize("settings", [("fp32", 0), ("bf16", 2)], ids=["fp32-zero0", "bf16-zero2"])
def test_nonfinite_step_is_skipped_on_cuda(process_group, tmp_path, settings):
    precision, zero_stage = settings
    poisoned_batch = 2

    def poison(epoch, batch, images):
        return images * float("nan") if (epoch, batch) == (0, poisoned_batch) else images

    trainer = cuda_trainer(tmp_path, f"engine.zero_stage={zero_stage}", f"engine.precision={precision}",
                           "optim.epochs=1", poison=poison)
    snapshots = {}
    finish_step = trainer.finish_step

    def recording_finish_step():  # the model as each optimizer step leaves it, guard included
        outcome = finish_step()
        snapshots[len(snapshots)] = weights(trainer)
        return outcome

    trainer.finish_step = recording_finish_step
    trainer.fit()
    assert trainer.guard.total_skipped == 1
    before, after = snapshots[poisoned_batch - 1], snapshots[poisoned_batch]
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed in a skipped step"
    assert all(torch.isfinite(v).all() for v in weights(trainer).values())


@gpu
def test_sync_batchnorm_engine_on_cuda(process_group, tmp_path):
    trainer = cuda_trainer(tmp_path, "model.sync_bn=true", "engine.precision=bf16", "engine.zero_stage=2",
                           "optim.epochs=1")
    norms = [m for m in trainer.engine.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, SyncBatchNormFP32) for m in norms)
    before = [m.running_mean.clone() for m in norms]
    trainer.fit()
    assert all(m.running_mean.dtype == torch.float32 for m in norms)
    assert any(not torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))
    assert all(torch.isfinite(m.running_var).all() for m in norms)


@gpu
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_activations_stay_channels_last_through_the_engine(process_group, tmp_path, zero_stage):
    """cuDNN runs a conv in NHWC when its input is NHWC, whatever the weight layout; the depth-wise
    7x7 convs need this to get cuDNN's kernel instead of the NCHW-only native one. ZeRO's flat
    parameter buffers keep weights contiguous (NCHW), so the input's layout is what must survive."""
    trainer = cuda_trainer(tmp_path, f"engine.zero_stage={zero_stage}", "engine.precision=bf16")
    layouts = {}

    def record(name):
        def hook(module, inputs, output):
            layouts[name] = output.is_contiguous(memory_format=torch.channels_last)
        return hook

    convs = {n: m for n, m in trainer.engine.module.named_modules() if isinstance(m, nn.Conv2d)}
    handles = [m.register_forward_hook(record(n)) for n, m in convs.items()]
    images, labels = next(trainer.train_loader.epoch(0))
    images = images.contiguous(memory_format=torch.channels_last)
    loss = trainer.loss_fn(trainer.engine(images.to(trainer.dtype)), labels)
    trainer.engine.backward(loss)
    trainer.engine.step()
    for h in handles:
        h.remove()
    assert layouts.keys() == convs.keys()
    not_nhwc = [n for n, nhwc in layouts.items() if not nhwc]
    assert not not_nhwc, f"conv outputs fell back to NCHW: {not_nhwc}"


# ---- data and inference on the device --------------------------------------------------------
@gpu
@pytest.mark.parametrize("erasing", [0.0, 1.0], ids=["no-erasing", "erasing"])
def test_batch_augment_on_cuda_matches_cpu(erasing):
    """The recipe's batch augmentations draw from Python/numpy streams scoped by the batch key, so
    the GPU computes the same augmentation as the CPU (up to interpolation rounding); random erasing
    fills with the device's normal stream, so there only the erased boxes must match."""
    from dwnet.config import AugmentConfig
    from dwnet.data.augment import BatchAugment

    cfg = AugmentConfig(random_erasing=erasing)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 48, 48), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,), generator=gen)
    outputs = {}
    for device in ("cpu", "cuda"):
        augment = BatchAugment(cfg, image_size=48, num_classes=10, batch_size=16, device=torch.device(device))
        x, targets = augment(images.to(device), labels.to(device), key=1234, channels_last=True)
        outputs[device] = (x.cpu(), targets.cpu())
    (x_cpu, t_cpu), (x_gpu, t_gpu) = outputs["cpu"], outputs["cuda"]
    torch.testing.assert_close(t_gpu, t_cpu)
    if erasing == 0.0:
        close = (x_gpu - x_cpu).abs() < 0.05  # ~3 grey levels after normalisation
        assert close.float().mean() > 0.999, f"{(~close).sum()} pixels differ"
    else:
        plain = BatchAugment(AugmentConfig(random_erasing=0.0), image_size=48, num_classes=10, batch_size=16,
                             device=torch.device("cpu"))
        x_plain, _ = plain(images, labels, key=1234, channels_last=True)
        erased_cpu = (x_cpu - x_plain).abs().amax(1) > 1e-6
        erased_gpu = (x_gpu - x_plain).abs().amax(1) > 0.05
        assert erased_cpu.any()
        assert (erased_cpu ^ erased_gpu).float().mean() < 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["dwnet_nano", "dynamic_dwnet_nano"])
def test_fused_inference_matches_unfused(device, name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).to(device)
    with torch.no_grad():  # non-trivial statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    fused = fuse_batchnorm(copy.deepcopy(model))
    x = torch.randn(4, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    # cuDNN convolutions default to TF32 (10-bit mantissa), whose rounding alone differs by ~1e-4
    # between two algebraically equal networks; the folding is checked in true fp32.
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            want, got = model(x), fused(x)
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    assert relative_error(got, want) < 1e-5


# ---- device binding ----------------------------------------------------------------------------
@pytest.mark.parametrize("visible, local_rank, expected", [(8, 3, 3), (1, 3, 0)], ids=["node-of-8", "one-per-rank"])
def test_rank_computes_on_the_gpu_it_was_bound_to(monkeypatch, visible, local_rank, expected):
    """A launcher that shows each rank only its own GPU (srun --gpus-per-task=1) gives LOCAL_RANK=3
    and one visible device: that rank must run on cuda:0, not ask for cuda:3."""
    from dwnet.distributed import process_group as distributed

    bound: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: bound[-1])
    monkeypatch.setattr(distributed, "_uses_cuda", lambda: True)
    env = distributed.DistEnv(rank=local_rank, world_size=visible * 2, local_rank=local_rank, local_world_size=8,
                              node_rank=0, master_addr="127.0.0.1", master_port=29500, launcher="slurm")
    distributed._bind_device(env, cuda=True)
    assert bound == [expected]
    assert distributed.training_device() == torch.device("cuda", expected)


def test_cpu_accelerator_trains_on_the_cpu_even_where_cuda_is_visible(monkeypatch):
    from dwnet.distributed import training_device

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device() == torch.device("cpu")


@gpu
def test_ffcv_loader_on_cuda_matches_cpu(digits_betons):
    """ffcv decodes on the host and copies to the GPU on its own CUDA streams (ToDevice, non-blocking):
    the batches the GPU loader yields must be exactly the CPU loader's, batch after batch (a missing
    stream synchronisation shows up as a batch still being overwritten while it is read)."""
    pytest.importorskip("ffcv")
    from dwnet.config import load_config
    from dwnet.data import build_train_loader, build_val_loader

    cfg = load_config(None, [f"data.train_path={digits_betons / 'train.beton'}", "data.image_size=32",
                             "data.batch_size=16", "data.num_workers=2", "model.num_classes=10",
                             "augment.rand_augment=", "augment.random_erasing=0", "augment.mixup=0",
                             "augment.cutmix=0", "augment.label_smoothing=0"])
    loaders = {device: build_train_loader(cfg.data, cfg.augment, num_classes=10, rank=0, world_size=1, seed=3,
                                          device=torch.device(device), channels_last=True)
               for device in ("cpu", "cuda")}
    batches = {device: [(x.cpu(), y.cpu()) for x, y in loader.epoch(1)] for device, loader in loaders.items()}
    assert len(batches["cuda"]) == len(batches["cpu"]) > 2
    for (x_gpu, y_gpu), (x_cpu, y_cpu) in zip(batches["cuda"], batches["cpu"], strict=True):
        assert torch.equal(y_gpu, y_cpu)
        torch.testing.assert_close(x_gpu, x_cpu, rtol=0, atol=1e-5)
    val_cfg = load_config(None, [f"data.val_path={digits_betons / 'val.beton'}", "data.image_size=32",
                                 "data.batch_size=16", "data.num_workers=2"])
    val = {device: [(x.cpu(), y.cpu()) for x, y in build_val_loader(val_cfg.data, rank=0, world_size=1,
                                                                    device=torch.device(device))]
           for device in ("cpu", "cuda")}
    for (x_gpu, y_gpu), (x_cpu, y_cpu) in zip(val["cuda"], val["cpu"], strict=True):
        assert torch.equal(y_gpu, y_cpu) and torch.equal(x_gpu, x_cpu)
