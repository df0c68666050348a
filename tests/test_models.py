import copy
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
    study, convolutions = count_macs(model, (512, 1024))
    assert f"{study / 1e9:.2f}" == "374.66"  # the study's table, in fvcore's convention
    assert f"{convolutions / 1e9:.2f}" == "373.66"
    # BatchNorm output elements by hand: conv1 at 256x512; layer1 at 129x257 (ceil-mode max-pool); layers 2-4 at
    # 65x129. A block normalises planes, planes and 4 x planes channels; each layer's first block a downsample too
    layer = lambda blocks, planes: blocks * 6 * planes + 4 * planes  # noqa: E731
    norm = 64 * 256 * 512 + layer(3, 64) * 129 * 257 + (layer(4, 128) + layer(23, 256) + layer(3, 512)) * 65 * 129
    assert study - convolutions == 2 * norm + 4 * 19 * 512 * 1024  # scale and shift; the final bilinear upsampling


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
               tmp_path / "evil.pth")
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


# ---- DeepLabV3+, output stride and the aux head ---------------------------------------------------------------------

PLUS = ["deeplabv3plus_mobilenet_v3_large", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101"]


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


@pytest.mark.parametrize(
    "arch, stride",
    [(PLUS[0], None), (PLUS[1], 8), (PLUS[1], 16), (PLUS[2], 8), (PLUS[2], 16), ("deeplabv3_resnet50", 16)],
)
def test_logits_come_at_odd_input_sizes_at_both_output_strides(arch, stride):
    model = build_model(arch, 4, output_stride=stride).eval()
    x = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        out = model.backbone(x)["out"]
        assert model(x).shape == (2, 4, 37, 53)
        head = model(x, upsample=False)
    expected = stride or 16
    assert out.shape[-2:] == (ceil_div(37, expected), ceil_div(53, expected))  # the last stage at the output stride
    decoder = 4 if "plus" in arch else expected  # DeepLabV3+'s decoder works at stride 4
    assert head.shape[-2:] == (ceil_div(37, decoder), ceil_div(53, decoder))


def test_deeplabv3plus_head_has_the_papers_layers():
    # the head's parameters counted by hand from the paper's description, for 2048 ASPP and 256 low-level channels
    c, aspp, low = 6, 2048, 256
    bn = lambda n: 2 * n  # noqa: E731  (weight and bias)
    expected = (
        aspp * 256 + bn(256)  # ASPP 1x1
        + 3 * (aspp * 256 * 9 + bn(256))  # three 3x3 atrous convs
        + aspp * 256 + bn(256)  # image pooling
        + 5 * 256 * 256 + bn(256)  # projection of the five branches
        + low * 48 + bn(48)  # low-level features to 48 channels
        + (256 + 48) * 256 * 9 + bn(256) + 256 * 256 * 9 + bn(256)  # two 3x3 convs
        + 256 * c + c  # classifier
    )
    model = build_model("deeplabv3plus_resnet50", c)
    assert sum(p.numel() for p in model.classifier.parameters()) == expected
    assert [m[0].dilation for m in model.classifier.aspp.convs[1:4]] == [(6, 6), (12, 12), (18, 18)]  # at 16
    at_8 = build_model("deeplabv3plus_resnet50", c, output_stride=8)
    assert [m[0].dilation for m in at_8.classifier.aspp.convs[1:4]] == [(12, 12), (24, 24), (36, 36)]


def aspp_dilations(model: torch.nn.Module) -> list[int]:
    aspp = model.classifier.aspp if hasattr(model.classifier, "aspp") else model.classifier[0]
    return [branch[0].dilation[0] for branch in aspp.convs[1:4]]


@pytest.mark.parametrize("arch, stride, rates, expected", [
    ("deeplabv3_mobilenet_v3_large", None, None, [12, 24, 36]),  # torchvision's deeplabv3_mobilenet_v3_large
    ("deeplabv3_mobilenet_v3_large", None, (6, 12, 18), [6, 12, 18]),
    (PLUS[0], None, None, [6, 12, 18]),  # DeepLabV3's rates at output stride 16
    ("deeplabv3_resnet50", 16, None, [6, 12, 18]),
    ("deeplabv3_resnet50", 8, None, [12, 24, 36]),  # twice them at 8
    (PLUS[1], 8, (3, 5, 7), [3, 5, 7]),
])
def test_atrous_rates_follow_the_output_stride_unless_given(arch, stride, rates, expected):
    assert aspp_dilations(build_model(arch, 3, output_stride=stride, atrous_rates=rates)) == expected


def test_a_checkpoint_rebuilds_its_atrous_rates_and_one_without_them_gets_torchvisions(tmp_path):
    torch.manual_seed(0)
    arch = "deeplabv3_mobilenet_v3_large"
    trained = build_model(arch, 3, atrous_rates=(6, 12, 18)).eval()
    x = torch.randn(1, 960, 10, 10)  # the head's input: rates 6 and 12 reach past the centre on it, 24 and 36 do not
    checkpoint = {"model": trained.state_dict(), "num_classes": 3, "args": {"arch": arch, "atrous_rates": [6, 12, 18]}}
    rebuilt = models.model_from_checkpoint(checkpoint, tmp_path / "best.pth").eval()
    older = models.model_from_checkpoint({**checkpoint, "args": {"arch": arch}}, tmp_path / "old.pth").eval()
    with torch.no_grad():
        assert torch.equal(rebuilt.classifier(x), trained.classifier(x))
        assert not torch.allclose(older.classifier(x), trained.classifier(x))  # the same weights, another function
    assert aspp_dilations(older) == [12, 24, 36]


def test_atrous_rates_for_deeplabv2_are_one_clear_error():
    with pytest.raises(ModelError, match="--atrous-rates: DeepLabV2") as e:
        build_model("deeplabv2_resnet101", 3, atrous_rates=(6, 12, 18))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", PLUS)
def test_param_groups_cover_every_trainable_parameter_once_the_decoder_and_aux_head_in_the_head(arch):
    model = build_model(arch, 3, aux=True)
    backbone, head = param_groups(model, 0.01, 10.0)
    ids = [id(p) for g in (backbone, head) for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in head["params"]} == {
        id(p) for name, p in model.named_parameters() if name.startswith(("classifier.", "aux_classifier."))
    }
    assert head["lr"] == pytest.approx(0.1) and backbone["lr"] == 0.01


def test_a_frozen_backbone_stays_bit_identical_through_a_step_while_the_decoder_learns():
    model = build_model(PLUS[0], 3)
    models.freeze_backbone(model)
    models.set_train_mode(model)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # weights and BatchNorm statistics
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    optimizer = torch.optim.SGD(param_groups(model, 0.1, 1.0), lr=0.1, momentum=0.9)
    x, y = torch.randn(2, 3, 48, 64), torch.randint(0, 3, (2, 48, 64))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())
    assert not all(torch.equal(v, model.classifier.state_dict()[k]) for k, v in head.items())


def test_the_aux_loss_moves_the_backbone_but_not_what_the_model_predicts():
    torch.manual_seed(0)
    model = build_model(PLUS[0], 3, aux=True).train()
    x, y = torch.randn(2, 3, 48, 64), torch.randint(0, 3, (2, 48, 64))

    def backbone_grad(aux_weight: float) -> torch.Tensor:
        model.zero_grad()
        logits, aux_logits = model(x, aux=True)
        loss = torch.nn.functional.cross_entropy(logits, y)
        (loss + aux_weight * torch.nn.functional.cross_entropy(aux_logits, y)).backward()
        return torch.cat([p.grad.flatten() for p in model.backbone.parameters() if p.grad is not None])

    torch.manual_seed(1)
    plain = backbone_grad(0.0)
    torch.manual_seed(1)
    assert not torch.allclose(plain, backbone_grad(0.5))

    without = build_model(PLUS[0], 3).eval()
    checkpoint = {"model": model.state_dict(), "args": {"arch": PLUS[0]}}
    models.load_weights(without, checkpoint, Path("x.pth"))  # the same weights, no aux head
    calls = []
    model.aux_classifier.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), without(x)) and calls == []  # evaluation never runs the aux head
    assert count_params(model) == count_params(without) and models.aux_params(model) > 0


def test_a_checkpoint_rebuilds_its_output_stride_and_aux_head():
    args = {"arch": "deeplabv3plus_resnet50", "output_stride": 8, "aux_loss": 0.5}
    trained = build_model("deeplabv3plus_resnet50", 3, output_stride=8, aux=True)
    checkpoint = {"model": trained.state_dict(), "args": args, "num_classes": 3, "class_names": ["a", "b", "c"]}
    model = models.model_from_checkpoint(checkpoint, Path("x.pth"))
    assert model.backbone.layer3[0].conv2.stride == (1, 1) and model.aux_classifier is not None  # dilated, not strided
    assert build_model("deeplabv3plus_resnet50", 3).backbone.layer3[0].conv2.stride == (2, 2)  # the default: 16


def test_output_stride_is_refused_where_the_arch_has_one_only():
    for arch, stride in (("deeplabv3_mobilenet_v3_large", 8), ("deeplabv2_resnet101", 16)):
        with pytest.raises(ModelError, match=f"--output-stride {stride}: {arch} has output stride"):
            build_model(arch, 3, output_stride=stride)


# ---- memory format -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", models.ARCHS)
def test_channels_last_gives_the_logits_and_loss_of_contiguous_memory(arch):
    torch.manual_seed(0)
    model = build_model(arch, 4).eval()
    x, y = torch.randn(2, 3, 33, 47), torch.randint(0, 4, (2, 33, 47))
    with torch.no_grad():
        plain = model(x)
        fast = models.place(copy.deepcopy(model), arch, "on", torch.device("cpu"))
        assert (
            models.memory_format_of(fast) == torch.channels_last
            and models.memory_format_of(model) != torch.channels_last
        )
        last = fast(x.contiguous(memory_format=torch.channels_last))
    scale = plain.abs().max().item()  # an untrained DeepLabV2's logits reach thousands: tolerance relative to them
    assert torch.allclose(plain, last, rtol=1e-4, atol=1e-5 * scale)
    loss = torch.nn.functional.cross_entropy
    assert loss(plain, y).item() == pytest.approx(loss(last, y).item(), rel=1e-5)


def test_auto_memory_format_is_the_winner_of_a_race_run_once_per_shape_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    races = []

    def race(model, shape, train, steps=models.LAYOUT_STEPS):
        races.append((shape, train))
        return {"contiguous": 10.0, "channels_last": 12.0 if shape[1] > 100 else 8.0}

    monkeypatch.setattr(models, "race_layouts", race)
    cpu, model = torch.device("cpu"), torch.nn.Conv2d(3, 4, 3)
    choose = lambda shape, train=True: models.layout_choice("auto", "a", cpu, model, shape, train)[0]  # noqa: E731
    assert choose((8, 160, 224)) and not choose((8, 48, 64))
    assert choose((8, 160, 224)) and not choose((8, 48, 64))  # the cache answers: no second race
    assert not choose((1, 48, 64), train=False)
    assert races == [((8, 160, 224), True), ((8, 48, 64), True), ((1, 48, 64), False)]
    assert "channels_last 12.00 against contiguous 10.00" in models.layout_choice("auto", "a", cpu, model,
                                                                                 (8, 160, 224), True)[1]
    assert models.layout_choice("auto", "a", torch.device("cuda"), model)[0]  # unmeasured on CUDA: channels_last
    assert models.layout_choice("on", "a", cpu)[0] and not models.layout_choice("off", "a", torch.device("cuda"))[0]


def test_a_layout_race_leaves_the_model_and_the_random_state_as_they_were():
    torch.manual_seed(0)
    model = build_model("deeplabv3_mobilenet_v3_large", 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    speeds = models.race_layouts(model, (2, 32, 48), train=True, steps=1)
    assert set(speeds) == {"contiguous", "channels_last"} and all(v > 0 for v in speeds.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and models.memory_format_of(model) == torch.contiguous_format


@pytest.mark.parametrize("layout", ["on", "off"])
def test_model_input_is_normalized_by_imagenet_statistics_in_the_layout_of_the_model(layout):
    model = models.place(build_model("deeplabv3_mobilenet_v3_large", 3), "a", layout, torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    x = models.model_input(images, model, torch.device("cpu"))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet's, by hand
    assert x.dtype == torch.float32 and images.dtype == torch.uint8  # the batch itself is left as it was
    assert torch.allclose(x, (images / 255.0 - mean.view(3, 1, 1)) / std.view(3, 1, 1), atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last) == (layout == "on")
