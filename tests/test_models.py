"""The four published DWNet models, built faithfully: sizes, names, reference outputs, timm API."""
import copy

import pytest
import timm
import torch

import dwnet  # noqa: F401  (registers the models)
from dwnet.models import (PUBLISHED_MODELS, BatchNormFP32, CheckpointMismatchError, DWNet, count_macs, count_parameters,
                          create_model, fuse_batchnorm, load_checkpoint)

PUBLISHED = {
    # name: (exact params, GFLOPs (MACs) at 224 as published)
    "dwnet_tiny": (24_172_744, 3.74),
    "dynamic_dwnet_tiny": (51_131_752, 3.77),
    "dwnet_base": (74_347_112, 12.84),
    "dynamic_dwnet_base": (161_597_928, 12.93),
}


def tiny_dwnet(dynamic: bool = False, drop_path_rate: float = 0.0, **kwargs) -> DWNet:
    return DWNet(embed_dim=16, depths=(1, 1, 2, 1), num_classes=5, dynamic=dynamic,
                 drop_path_rate=drop_path_rate, **kwargs)


def with_random_bn_statistics(model: DWNet, size: int = 64) -> DWNet:
    """A few train-mode passes so that running statistics are not the trivial 0/1."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size) * 2 + 0.5)
    return model.eval()


def test_the_published_figures_cover_the_published_models():
    assert tuple(PUBLISHED) == PUBLISHED_MODELS


@pytest.mark.parametrize("name", PUBLISHED)
def test_exact_parameter_count(name):
    model = timm.create_model(name)
    assert count_parameters(model) == PUBLISHED[name][0]


@pytest.mark.parametrize("name", PUBLISHED)
def test_gflops_at_224_within_2_percent(name):
    model = timm.create_model(name)
    gmacs = count_macs(model, (3, 224, 224)) / 1e9
    assert gmacs == pytest.approx(PUBLISHED[name][1], rel=0.02)


@pytest.mark.parametrize("name, manifest", [("dwnet_tiny", "keys_dwnet_tiny.txt"),
                                            ("dynamic_dwnet_tiny", "keys_dynamic_dwnet_tiny.txt")])
def test_state_dict_keys_and_shapes_match_release(name, manifest, data_dir):
    model = timm.create_model(name)
    ours = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    expected = [line for line in (data_dir / manifest).read_text().splitlines() if line.strip()]
    assert ours == expected


def test_reference_checkpoint_reproduces_reference_output(data_dir):
    io = torch.load(data_dir / "dwnet_e24_d1121_c10_io.pt", weights_only=True)
    model = create_model("dwnet_femto", checkpoint=data_dir / "dwnet_e24_d1121_c10.pth", strict=True).eval()
    with torch.no_grad():
        y = model(io["x"])
    torch.testing.assert_close(y, io["y"], atol=1e-5, rtol=1e-5)


def test_timm_pretrained_file_overlay_loads_official_format(data_dir):
    model = timm.create_model(
        "dwnet_femto", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(data_dir / "dwnet_e24_d1121_c10.pth"), num_classes=10)).eval()
    io = torch.load(data_dir / "dwnet_e24_d1121_c10_io.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io["y"], atol=1e-5, rtol=1e-5)


def test_wrong_model_checkpoint_names_the_keys(data_dir):
    ckpt = data_dir / "dwnet_e24_d1121_c10.pth"
    dynamic = DWNet(embed_dim=24, depths=(1, 1, 2, 1), num_classes=10, dynamic=True)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(dynamic, ckpt)
    message = str(err.value)
    assert str(ckpt) in message and "missing keys: " in message and "attn2conv.conv.conv1.weight" in message
    assert "unexpected keys: " in message and "attn2conv.conv.weight" in message

    wrong_classes = DWNet(embed_dim=24, depths=(1, 1, 2, 1), num_classes=7)
    with pytest.raises(CheckpointMismatchError, match=r"head.weight \(10, 192\) vs model \(7, 192\)"):
        load_checkpoint(wrong_classes, ckpt)


def test_missing_checkpoint_file_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth: checkpoint file not found"):
        load_checkpoint(tiny_dwnet(), tmp_path / "nope.pth")


@pytest.mark.parametrize("dynamic", [False, True])
def test_forward_backward_reaches_every_parameter(dynamic):
    # Seeded: stochastic depth drops a branch for both samples of the batch in ~3% of draws, and
    # that branch's parameters then rightly get no gradient.
    torch.manual_seed(0)
    model = tiny_dwnet(dynamic, drop_path_rate=0.1).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("dynamic", [False, True])
def test_eval_output_does_not_depend_on_batch_mates(dynamic):
    """Kernels are generated per sample, so in eval mode batching must not change a sample's output."""
    model = with_random_bn_statistics(tiny_dwnet(dynamic))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_dynamic_conv_generates_different_kernels_for_different_inputs():
    model = with_random_bn_statistics(tiny_dwnet(dynamic=True))
    conv = model.layers[0].blocks[0].attn2conv.conv
    with torch.no_grad():
        kernels = conv.generate_kernels(torch.randn(2, 16, 8, 8))
    assert kernels.shape == (2 * 16, 1, 7, 7)
    assert not torch.allclose(kernels[:16], kernels[16:])


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (33, 40), (7, 7)])
def test_any_input_size(size):
    model = tiny_dwnet().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-post-ops", "eager-ops"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_batchnorm_fusion_matches_unfused(dynamic, onednn):
    from dwnet.models.fusion import FusedDWNetBlock, onednn_pointwise_available

    if onednn and not onednn_pointwise_available():
        pytest.skip("this torch build lacks oneDNN's pointwise post-op kernels")
    model = with_random_bn_statistics(tiny_dwnet(dynamic))
    x = torch.randn(3, 3, 72, 56)
    fused = fuse_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    blocks = [m for m in fused.modules() if isinstance(m, FusedDWNetBlock)]
    assert len(blocks) == 1 + 1 + 2 + 1  # tiny_dwnet's depths
    for block in blocks:
        block.onednn_ok = block.onednn_ok and onednn
        assert block._use_onednn(x) is False  # grad mode on: never the inference-only kernels
    with torch.no_grad():
        assert all(block._use_onednn(x) == onednn for block in blocks)
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_fusion_refuses_training_mode():
    with pytest.raises(RuntimeError, match="eval"):
        fuse_batchnorm(tiny_dwnet().train())


def test_channels_last_gives_same_output():
    model = with_random_bn_statistics(tiny_dwnet(dynamic=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_features_only_gives_four_stage_maps():
    backbone = timm.create_model("dwnet_femto", features_only=True)
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == [24, 48, 96, 192]
    maps = backbone(torch.randn(2, 3, 128, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 24, 32, 24), (2, 48, 16, 12), (2, 96, 8, 6), (2, 192, 4, 3)]


def test_forward_intermediates_agree_with_forward_features():
    model = with_random_bn_statistics(tiny_dwnet())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, norm=True)
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(feats[-1], final)  # the last stage has no merging after it
        torch.testing.assert_close(only[0], feats[1])


def test_forward_head_pre_logits_and_reset_classifier():
    model = tiny_dwnet().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = tiny_dwnet()
    x = torch.randn(2, 3, 64, 64)
    reference = copy.deepcopy(model)
    reference(x).sum().backward()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_batchnorm_stays_fp32_in_bf16_model():
    model = tiny_dwnet(dynamic=True).bfloat16().train()
    bn = model.layers[0].blocks[0].attn2conv.bn0
    assert isinstance(bn, BatchNormFP32)
    assert bn.running_mean.dtype == torch.float32 and bn.weight.dtype == torch.bfloat16
    before = bn.running_mean.clone()
    out = model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16
    assert not torch.equal(before, bn.running_mean)  # statistics were updated, in fp32
    assert int(bn.num_batches_tracked) == 1


def test_bf16_eval_close_to_fp32():
    model = with_random_bn_statistics(tiny_dwnet())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = copy.deepcopy(model).bfloat16()(x.bfloat16()).float()
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def test_drop_path_rates_grow_linearly_and_are_shared_within_a_block():
    model = timm.create_model("dwnet_tiny")
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for stage in model.layers for blk in stage.blocks]
    assert len(rates) == 12 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert steps == pytest.approx([0.2 / 11] * 11)
