"""Building models by name and loading weights into them: timm's pretrained path (stem
adaptation, new heads), `dwnet.models.build_model` from a run config, the backbone-only load."""
import pytest
import timm
import torch

import dwnet  # noqa: F401  (registers the models)
from dwnet.config import ConfigError, RunConfig
from dwnet.models import CheckpointMismatchError, build_model, create_model, load_backbone, read_state_dict

REFERENCE = "dwnet_e24_d1121_c10.pth"


@pytest.fixture
def reference(data_dir):
    path = data_dir / REFERENCE
    return path, read_state_dict(path)


def from_file(path, **kwargs) -> torch.nn.Module:
    """timm's offline pretrained path: the file overlays the cfg's release URL."""
    return timm.create_model("dwnet_femto", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **kwargs).eval()


def test_norms_are_timm_layers_with_the_released_eps():
    model = timm.create_model("dwnet_femto")
    channel_norms = [m for m in model.modules() if isinstance(m, timm.layers.LayerNorm2d)]
    assert len(channel_norms) == 2  # stem and final norm, on NCHW maps
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_grayscale_stem_is_the_sum_of_the_rgb_filters(reference):
    path, state = reference
    rgb, gray = from_file(path), from_file(path, in_chans=1)
    torch.testing.assert_close(gray.patch_embed.proj.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # a grey image through the RGB model gives the same logits
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_four_channel_stem_repeats_rgb_filters_scaled(reference):
    path, state = reference
    model = from_file(path, in_chans=4)
    rgb = state["patch_embed.proj.weight"]
    expected = torch.cat([rgb, rgb[:, :1]], dim=1) * 3 / 4  # cycled, then rescaled to keep the magnitude
    torch.testing.assert_close(model.patch_embed.proj.weight, expected)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if not k.startswith("patch_embed.proj.w"))
    assert model(torch.randn(1, 4, 64, 64)).shape == (1, 10)


def test_pretrained_with_another_num_classes_keeps_the_backbone(reference):
    path, state = reference
    model = from_file(path, num_classes=5)
    own = model.state_dict()
    assert own["head.weight"].shape == (5, 192)
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("head."))


def run_config(**model) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name = "dwnet_femto"
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_build_model_fine_tuning_loads_the_backbone_and_keeps_a_fresh_head(reference):
    path, state = reference
    torch.manual_seed(0)
    model = build_model(run_config(num_classes=37, pretrained=str(path), pretrained_strict=False,
                                   grad_checkpointing=True))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("head."))
    assert own["head.weight"].shape == (37, 192) and own["head.bias"].abs().sum() == 0  # its init
    assert all(stage.grad_checkpointing for stage in model.layers)


def test_build_model_strict_and_name_errors(reference):
    path, _ = reference
    with pytest.raises(CheckpointMismatchError, match=r"head.weight \(10, 192\) vs model \(37, 192\)"):
        build_model(run_config(num_classes=37, pretrained=str(path)))
    with pytest.raises(ConfigError, match="unknown model 'dwnet_huge'"):
        build_model(run_config(name="dwnet_huge"))
    model = build_model(run_config(num_classes=10, pretrained=str(path)))
    io_model = create_model("dwnet_femto", checkpoint=path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), io_model.state_dict().values(), strict=True))


def test_load_backbone_reports_what_it_left_and_refuses_a_foreign_checkpoint(reference):
    path, state = reference
    model = create_model("dwnet_femto", num_classes=3)
    assert load_backbone(model, state, str(path)) == ["head.weight", "head.bias"]
    nano = create_model("dwnet_nano")  # 32 wide: only some 1-D tensors of the 24-wide femto fit
    with pytest.raises(CheckpointMismatchError, match=r"only [\d,]+ of [\d,]+ backbone weights of DWNet fit"):
        load_backbone(nano, state, str(path))
    dynamic = create_model("dynamic_dwnet_nano", embed_dim=24, depths=(1, 1, 2, 1))
    with pytest.raises(CheckpointMismatchError, match="dynamic vs static"):
        load_backbone(dynamic, state, str(path))


def test_pretrained_true_fetches_the_release_url_and_loads_the_official_format(monkeypatch):
    """No network in tests: the download is replaced by a file of the released layout."""
    import timm.models._builder as builder

    torch.manual_seed(1)
    released = timm.create_model("dwnet_tiny").state_dict()
    fetched = []

    def fake_download(url, **kwargs):
        fetched.append(url)
        return {"model": released, "epoch": 299, "max_accuracy": 81.2}  # the release file's layout

    monkeypatch.setattr(builder, "load_state_dict_from_url", fake_download)
    model = timm.create_model("dwnet_tiny", pretrained=True)
    assert fetched == ["https://github.com/Atten4Vis/DemystifyLocalViT/releases/download/prerelease/dwnet_tiny_224.pth"]
    assert all(torch.equal(v, released[k]) for k, v in model.state_dict().items())
