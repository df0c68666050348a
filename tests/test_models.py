import urllib.error
from pathlib import Path

import pytest
import torch

import models
from models import ModelError, build_model, count_macs, count_params, load_checkpoint, load_init, param_groups


def test_deeplabv2_matches_the_study_params_and_macs():
    with torch.device("meta"):
        model = build_model("deeplabv2_resnet101", 19)
    trainable, total = count_params(model)
    assert trainable == 43_795_724 and total == trainable  # BatchNorm is frozen: buffers, not parameters
    assert count_macs(model, (512, 1024)) == pytest.approx(374.66e9, rel=0.005)


def test_deeplabv2_has_output_stride_8_with_ceil_mode_pooling():
    with torch.device("meta"):
        model = build_model("deeplabv2_resnet101", 19)
        features = model.backbone(torch.empty(1, 3, 512, 1024))
    assert features.shape == (1, 2048, 65, 129)  # ceil-mode max-pool: 256 -> 129, then layer2 halves it


@pytest.mark.parametrize("arch", ["deeplabv3_mobilenet_v3_large", "deeplabv2_resnet101"])
def test_logits_come_at_input_resolution(arch):
    model = build_model(arch, 5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 50, 70)).shape == (2, 5, 50, 70)


def test_deeplabv2_batchnorm_stays_frozen_in_train_mode():
    model = build_model("deeplabv2_resnet101", 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "bn" in k}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any("bn" in name for name, _ in model.named_parameters())


def test_param_groups_give_the_head_its_multiplier():
    model = build_model("deeplabv2_resnet101", 3)
    groups = param_groups(model, 1e-4, 10.0)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-3)]
    assert sum(p.numel() for g in groups for p in g["params"]) == count_params(model)[0]
    head = {id(p) for p in model.classifier.parameters()}
    assert all(id(p) in head for p in groups[1]["params"])


def test_init_loads_a_caffe_style_deeplab_file_and_skips_its_classifier(tmp_path):
    source = build_model("deeplabv2_resnet101", 21)
    state = {
        "Scale." + k.removeprefix("backbone."): v for k, v in source.state_dict().items() if k.startswith("backbone.")
    }
    state["Scale.layer5.conv2d_list.0.weight"] = torch.randn(21, 2048, 3, 3)
    torch.save(state, tmp_path / "DeepLab_resnet_pretrained_imagenet.pth")
    target = build_model("deeplabv2_resnet101", 19)
    head_before = {k: v.clone() for k, v in target.classifier.state_dict().items()}
    summary = load_init(target, tmp_path / "DeepLab_resnet_pretrained_imagenet.pth")
    assert "skipped 1" in summary
    src = source.backbone.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in target.backbone.state_dict().items())
    assert all(torch.equal(v, head_before[k]) for k, v in target.classifier.state_dict().items())


def test_init_refuses_a_file_missing_backbone_tensors(tmp_path):
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "w.pth")
    with pytest.raises(ModelError, match="lacks"):
        load_init(build_model("deeplabv3_mobilenet_v3_large", 3), tmp_path / "w.pth")


def test_pretrained_request_offline_fails_in_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    for arch in ("deeplabv3_mobilenet_v3_large", "deeplabv2_resnet101"):
        with pytest.raises(ModelError) as e:
            build_model(arch, 3, pretrained_backbone=True)
        assert "--no-pretrained" in str(e.value) and "--init PATH" in str(e.value) and "\n" not in str(e.value)


def test_unknown_arch_is_refused():
    with pytest.raises(ModelError, match="--arch"):
        models.build_model("unet", 3)


class Payload:
    """Unpickling this would create a file: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_pickled_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {}, "args": {"arch": "x"}, "num_classes": 3, "class_names": [], "hook": Payload(marker)},
               tmp_path / "evil.pth")  # fmt: skip
    with pytest.raises(ModelError) as e:
        load_checkpoint(tmp_path / "evil.pth")
    assert "cannot be loaded safely" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_clear_error(tmp_path):
    state = {"model": build_model("deeplabv3_mobilenet_v3_large", 3).state_dict(), "args": {}, "num_classes": 3}
    torch.save({**state, "class_names": ["a", "b", "c"]}, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:100_000])
    with pytest.raises(ModelError, match="cut.pth cannot be loaded safely"):
        load_checkpoint(tmp_path / "cut.pth")
