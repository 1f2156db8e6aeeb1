"""timm's model contract for every registered DWNet: what `timm.create_model` users rely on.

The small models (femto, nano, dynamic nano) get every check, including TorchScript and FX in
train and eval mode; the four published models, slow on CPU, are built once each and get the
checks that depend on their configuration (cfgs, shapes, scripting, FX tracing) at 32-64 px.
"""
import copy

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import dwnet  # noqa: F401  (registers the models)
from dwnet.models import PUBLISHED_MODELS, DWNet

SMALL = ("dwnet_femto", "dwnet_nano", "dynamic_dwnet_nano")
STATIC_AND_DYNAMIC = ("dwnet_femto", "dynamic_dwnet_nano")  # for the costlier checks: nano is femto's code
PUBLISHED = PUBLISHED_MODELS
RELEASES = "https://github.com/Atten4Vis/DemystifyLocalViT/releases/download/prerelease/"
TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit.script's deprecation notice
    pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing:UserWarning"),  # torchvision's FYI
]


def randomized(model: DWNet, size: int = 64) -> DWNet:
    """Non-trivial BatchNorm statistics, so that eval-mode comparisons mean something."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, model.patch_embed.proj.in_channels, size, size) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def published():
    """One instance per published model, built on first use (each takes seconds on CPU)."""
    cache = {}

    def get(name: str) -> DWNet:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = timm.create_model(name).eval()
        return cache[name]
    return get


def fx_classifier(model: DWNet) -> torch.nn.Module:
    """The model traced by torchvision's FX feature extractor with timm's leaf registry (what
    timm's `feature_cls='fx'` uses), returning the logits node in train and eval mode."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER_KWARGS)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=TRACER_KWARGS)


def only_value(outputs: dict) -> torch.Tensor:
    (value,) = outputs.values()
    return value


# ---- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_pretrained_cfg_points_at_the_release(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.url == f"{RELEASES}{name}_224.pth"
    assert cfg.num_classes == 1000 and cfg.input_size == (3, 224, 224) and cfg.pool_size == (7, 7)
    assert cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic" and cfg.license == "mit"
    assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    assert timm.list_models(name, pretrained=True) == [f"{name}.in1k"]


def test_registry_lists_every_variant_with_its_own_constructor():
    import dwnet.models.dwnet as module

    names = set(timm.list_models("*dwnet*"))
    assert names == set(SMALL + PUBLISHED)
    for name in names:
        assert getattr(module, name).__name__ == name  # grep-able: one function per variant


@pytest.mark.parametrize("name", SMALL + PUBLISHED)
def test_default_cfg_names_real_layers_and_pool_size(name, published):
    model = published(name) if name in PUBLISHED else timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert state[f"{cfg['classifier']}.weight"].shape[0] == cfg["num_classes"] == model.num_classes
    assert cfg["pool_size"] == (cfg["input_size"][-1] // 32,) * 2  # forward_features at the default size
    side = 32 if name in PUBLISHED else 64  # the published models' 224 is slow on CPU; the map scales
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, side, side))
    assert features.shape == (1, model.num_features, side // 32, side // 32)


# ---- forward / backward -------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_backward_reaches_every_parameter_with_and_without_grad_checkpointing(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    reference = copy.deepcopy(model)
    out = reference(x)
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    model.set_grad_checkpointing(True)
    model(x).mean().backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert q.grad is not None and p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", STATIC_AND_DYNAMIC)
def test_forward_kwargs_num_classes_global_pool_and_drop_rate(name):
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    base = randomized(timm.create_model(name))
    with torch.no_grad():
        features = base.forward_features(x)
        pooled = features.mean(dim=(2, 3))
        for kwargs, expected in [(dict(num_classes=0), pooled),
                                 (dict(num_classes=0, global_pool=""), features),
                                 (dict(global_pool="avg"), base(x))]:
            model = timm.create_model(name, **kwargs).eval()
            model.load_state_dict(base.state_dict(), strict="num_classes" not in kwargs)
            torch.testing.assert_close(model(x), expected, msg=str(kwargs))
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model(name, global_pool="max")

    model = timm.create_model(name, drop_rate=0.5)
    assert model.head_drop.p == 0.5
    model.load_state_dict(base.state_dict())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))  # dropout is off in eval
        model.train()
        model.forward_features = lambda _: features  # isolate the head: only dropout is random
        assert not torch.allclose(model(x), model(x))


# ---- features ----------------------------------------------------------------------------
@pytest.mark.parametrize("feature_cls", ["getter", "hook", "fx"])
@pytest.mark.parametrize("name", STATIC_AND_DYNAMIC)
def test_features_only_match_forward_intermediates(name, feature_cls, tmp_path):
    torch.manual_seed(0)
    model = randomized(timm.create_model(name))
    weights = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, weights)
    backbone = timm.create_model(name, features_only=True, feature_cls=feature_cls, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(weights))).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        maps = backbone(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    dim = model.feature_info[0]["num_chs"]
    assert backbone.feature_info.channels() == [dim, 2 * dim, 4 * dim, 8 * dim]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(m.shape) for m in maps] == [(1, dim * 2 ** i, 24 // 2 ** i, 16 // 2 ** i) for i in range(4)]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_features_only_out_indices_prunes_the_unused_stages():
    backbone = timm.create_model("dwnet_femto", features_only=True, out_indices=(1, 2))
    assert backbone.feature_info.reduction() == [8, 16]
    assert len(backbone.model.layers) == 3  # the last stage is never run
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [48, 96]


@pytest.mark.parametrize("name", STATIC_AND_DYNAMIC)
def test_forward_intermediates_indices_norm_stop_early_and_format(name):
    torch.manual_seed(0)
    model = randomized(timm.create_model(name))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]

        _, normed = model.forward_intermediates(x, indices=[3], norm=True)
        torch.testing.assert_close(normed[0], final)  # the last stage, through the final norm
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two[0], maps[2])
        torch.testing.assert_close(last_two[1], maps[3])

        early, taken = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        torch.testing.assert_close(taken[1], maps[1])
        torch.testing.assert_close(early, maps[1])  # stopped after stage 1, nothing more run

        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], maps[1].permute(0, 2, 3, 1))
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model.forward_intermediates(x)[0], final)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NCL")


# ---- TorchScript and FX --------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_torchscript_matches_eager(name):
    torch.manual_seed(0)
    model = randomized(timm.create_model(name))
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 72, 56)  # not a multiple of 32: the padding runs scripted too
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        with torch.jit.optimized_execution(False):
            torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("name", SMALL)
def test_fx_forward_backward_and_fx_then_torchscript(name):
    torch.manual_seed(0)
    model = randomized(timm.create_model(name))
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected)  # plain torch.fx too
        traced = fx_classifier(model).eval()
        torch.testing.assert_close(only_value(traced(x)), expected)
        torch.testing.assert_close(only_value(torch.jit.script(traced)(x)), expected)

    traced.train()
    only_value(traced(x)).logsumexp(dim=1).sum().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert missing == [] and len(list(traced.parameters())) == len(list(model.parameters()))


@pytest.mark.parametrize("name", STATIC_AND_DYNAMIC)
def test_fx_feature_extractor_scripts(name):
    backbone = timm.create_model(name, features_only=True, feature_cls="fx").eval()
    scripted = torch.jit.script(backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(scripted(x), backbone(x), strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_model_scripts_and_traces(name, published):
    model = published(name)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (1, 1000) and torch.isfinite(expected).all()
        # The profiling executor's first-run optimisation costs seconds and is not under test.
        with torch.jit.optimized_execution(False):
            torch.testing.assert_close(torch.jit.script(model)(x), expected)
        torch.testing.assert_close(only_value(fx_classifier(model).eval()(x)), expected)
