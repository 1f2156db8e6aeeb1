"""torch.compile gives the eager model's numbers (fp32, 1e-5) and needs no graph breaks.

Compiling is slow on CPU (tens of seconds per graph), so these use the smallest DWNet layout
(one block per stage); the code paths are those of every registered model.
"""
import copy

import pytest
import torch

from dwnet.models import DWNet

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_compile_thread():
    # On a 2-core machine a pool of compile workers costs more than it saves.
    with torch._inductor.config.patch(compile_threads=1):
        yield


def smallest(dynamic: bool) -> DWNet:
    torch.manual_seed(0)
    return DWNet(embed_dim=16, depths=(1, 1, 1, 1), num_classes=10, dynamic=dynamic, drop_path_rate=0.0)


def test_compile_fullgraph_train_step_matches_eager():
    """Forward, gradients and BatchNorm running statistics of one training step."""
    eager = smallest(dynamic=False).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 64, 64)  # 4 x 2 x 2 values per channel in the last BatchNorm: well-posed

    expected, got = eager(x), compiled(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.logsumexp(dim=1).sum().backward()
    got.logsumexp(dim=1).sum().backward()
    # Gradients that are zero in exact arithmetic (a bias right before a BatchNorm) are rounding
    # noise in both: compare every gradient on the scale of the largest one.
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
    for (name, b), c in zip(compiled_model.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_eval_matches_eager(dynamic):
    model = smallest(dynamic)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 64, 64) * 2 + 0.5)  # non-trivial running statistics
        model.eval()
        compiled = torch.compile(model, fullgraph=True)
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


# ---- the training engine under model.compile ----------------------------------------------------
def test_compile_options_say_when_the_step_cannot_be_captured():
    from dwnet.engine.capture import compile_options

    static = {"dynamic": False}
    assert compile_options("default", torch.device("cuda"), 0) == (static, None)
    assert compile_options("max-autotune", torch.device("cpu"), 0) == ({**static, "mode": "max-autotune"}, None)
    assert compile_options("reduce-overhead", torch.device("cuda"), 2) == ({**static, "mode": "reduce-overhead"}, None)
    for device, stage, why in [("cpu", 0, "need a CUDA device"), ("cuda", 3, "ZeRO-3")]:
        options, line = compile_options("reduce-overhead", torch.device(device), stage)
        assert options == static and why in line and "\n" not in line


def test_compiled_engine_trains_like_the_eager_one(tmp_path, process_group):
    """model.compile with compile_mode=reduce-overhead on CPU: says in one line that the step is
    not captured there, and its first steps' losses are the eager engine's (fp32, 1e-4)."""
    import logging
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import engine_worker
    from tensor_loaders import TensorTrainLoader, synthetic_dataset

    from dwnet.engine import Trainer

    torch._dynamo.reset()  # nothing carried over from the graphs other tests compiled
    images, labels = synthetic_dataset(64)
    losses = {}
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("dwnet").addHandler(handler)
    try:
        for name, extra in [("eager", []), ("compiled", ["model.compile=true", "model.compile_mode=reduce-overhead"])]:
            cfg = engine_worker.tiny_run_config(str(tmp_path / name), "optim.epochs=1", *extra)
            trainer = Trainer(cfg, 0, 1, torch.device("cpu"), train_loader=TensorTrainLoader(images, labels, 16),
                              model_factory=lambda _: smallest(dynamic=False))
            assert trainer.engine.is_compiled == (name == "compiled") and not trainer.captured
            losses[name] = []
            for i in range(0, 48, 16):
                losses[name].append(trainer.micro_step(images[i:i + 16], labels[i:i + 16], micro_batch=0).item())
                trainer.finish_step()
    finally:
        logging.getLogger("dwnet").removeHandler(handler)
    assert sum("compile_mode=reduce-overhead captures CUDA graphs" in line for line in lines) == 1, lines
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), atol=1e-4, rtol=1e-4)
