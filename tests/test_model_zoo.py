"""The model zoo: every model file composes, builds and trains a step on CPU; weights files; freezing."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.config import CONFIG_DIR
from agecls.models import WeightsError, available_models, create_backbone, create_model, skip_weights
from agecls.tasks.module import FaceClassifier
from agecls.training.train import train

# A model file builds its own model; a preset (model=agecnn) is another file's keys with some values changed.
_FILES = sorted((CONFIG_DIR / "model").glob("*.yaml"))
PRESETS = sorted(p.stem for p in _FILES if "defaults" in OmegaConf.load(p))
MODEL_FILES = sorted(p.stem for p in _FILES if p.stem not in PRESETS)

# Per model: the smallest sensible image size and the overrides that keep the CPU test small. Each is
# applied to the composed model file, so the test also proves every file's keys are builder arguments.
SMALL = {
    "basic_cnn": (32, {"blocks": 2, "base_channels": 4, "hidden": 16}),
    "vgg16": (32, {"avgpool_size": 1, "hidden": 64}),
    "resnet50": (32, {}),
    "resnet152": (32, {}),
    "densenet121": (32, {}),
    "densenet201": (32, {}),
    "efficientnet_v2_s": (32, {}),
    "efficientnet_v2_m": (32, {}),
    "efficientnet_v2_l": (32, {}),
    "torchvision": (32, {"arch": "mobilenet_v3_small"}),
    "inception_resnet_v1": (75, {}),
    "residual_attention": (32, {"width": 8}),
}
# Several seconds to build: run once, greyscale only.
BIG = {"resnet152", "efficientnet_v2_m", "efficientnet_v2_l", "densenet201"}
CASES = [(name, c) for name in sorted(SMALL) for c in ((1,) if name in BIG else (1, 3))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine it is several times faster for these tiny batches."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def composed_model(name: str) -> dict:
    """The `model=<name>` group as `agecls-train` composes it (once per file: composing takes a while)."""
    return OmegaConf.to_container(compose_train([f"model={name}"]).model, resolve=True)


def model_cfg(name: str, **extra) -> dict:
    """The composed model file with the small-test overrides, as create_model keyword arguments."""
    size, small = SMALL[name]
    kwargs = composed_model(name) | small | extra
    return {"name": kwargs.pop("name"), "image_size": size, **kwargs}


def build(name: str, num_classes: int = 3, in_chans: int = 1, **extra) -> torch.nn.Module:
    args = model_cfg(name, **extra)
    return create_model(args.pop("name"), num_classes=num_classes, in_chans=in_chans, **args)


def test_every_registered_model_has_a_file_and_a_test():
    assert set(available_models()) == set(MODEL_FILES) == set(SMALL)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_a_registered_model(preset):
    assert composed_model(preset)["name"] in available_models()


@pytest.mark.parametrize(("name", "in_chans"), CASES)
def test_model_builds_and_trains_a_step(name, in_chans):
    args = model_cfg(name)
    size = args["image_size"]
    assert args.pop("name") == name
    model = create_model(name, num_classes=5, in_chans=in_chans, **args)
    model.train()
    out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(set(SMALL) - BIG))
def test_backbone_gives_features_without_the_classifier(name):
    args = model_cfg(name)
    size = args.pop("image_size")
    args.pop("name")
    trunk, dim = create_backbone(name, in_chans=3, image_size=size, **args)
    trunk.eval()
    feats = trunk(torch.randn(2, 3, size, size))
    assert feats.shape == (2, dim)
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 2 for m in trunk.modules())


def test_basic_cnn_backbone_is_the_dissertation_multitask_trunk():
    trunk, dim = create_backbone(
        "basic_cnn", in_chans=1, image_size=32, blocks=2, base_channels=4, hidden=132
    )
    assert dim == 132 and isinstance(trunk.classifier[4], torch.nn.Identity)


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("name", ["resnet50", "inception_resnet_v1", "residual_attention", "basic_cnn"])
def test_weights_round_trip_gives_equal_outputs(name, compose_cfg, tmp_path):
    torch.manual_seed(0)
    source = build(name).eval()
    path = _save(source.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    loaded = build(name, weights=path).eval()
    size = SMALL[name][0]
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_lightning_style_checkpoint_and_explicit_prefix(tmp_path):
    source = build("residual_attention").eval()
    state = {f"model.{k}": v for k, v in source.state_dict().items()} | {"heads.age.bias": torch.zeros(6)}
    ckpt = _save({"state_dict": state, "epoch": 3}, tmp_path / "best.ckpt")  # agecls/Lightning layout
    auto = build("residual_attention", weights=ckpt).eval()
    wrapped = _save({"model": {f"net.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pt")
    explicit = build("residual_attention", weights=wrapped, weights_prefix="net.").eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), auto(x)) and torch.equal(source(x), explicit(x))


def test_a_torchvision_rgb_file_loads_into_a_greyscale_model_with_other_classes(tmp_path):
    reference = torchvision.models.resnet50(weights=None, num_classes=1000)  # stands in for ImageNet weights
    path = _save(reference.state_dict(), tmp_path / "resnet50-imagenet.pth")
    model = create_model("resnet50", num_classes=7, in_chans=1, image_size=32, weights=path)
    # First conv: RGB kernels summed (the same output on a grey image replicated to RGB).
    assert torch.allclose(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert model.fc[1].weight.shape == (7, 2048)  # the new classifier keeps its initialisation
    x = torch.rand(2, 1, 32, 32)
    model.eval(), reference.eval()
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(reference.children())[:-1])
        ours = torch.nn.Sequential(*list(model.children())[:-1])
        assert torch.allclose(ours(x), trunk(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="model.weights=.*nope.pt: no such file"):
        create_model("basic_cnn", num_classes=3, in_chans=1, image_size=32, blocks=2, weights=str(missing))


def test_skip_weights_rebuilds_without_the_weights_file(tmp_path):
    with skip_weights():
        model = build("basic_cnn", weights=str(tmp_path / "moved-away.pt"), freeze="features")
    assert _trainable(model) == {"classifier.1", "classifier.4"}


def test_mismatched_weights_name_the_keys(tmp_path):
    state = build("basic_cnn").state_dict()
    del state["features.1.0.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["classifier.1.weight"] = torch.zeros(5, 5)
    path = _save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError) as err:
        build("basic_cnn", weights=path)
    message = str(err.value)
    assert "bad.pt" in message and "features.1.0.bias" in message and "extra.weight" in message
    assert "classifier.1.weight file (5, 5)" in message and "strict_weights=false" in message
    # Non-strict: everything that fits is loaded, the rest keeps its initialisation.
    model = build("basic_cnn", weights=path, strict_weights=False)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = _save(build("residual_attention", depth=56).state_dict(), tmp_path / "attention56.pt")
    with pytest.raises(
        WeightsError, match="attention56.pt does not fit .*missing from the file .*features.2.2"
    ):
        build("residual_attention", depth=92, weights=path)
    with pytest.raises(WeightsError, match="no tensor fits model 'basic_cnn'"):
        create_model("basic_cnn", num_classes=3, in_chans=1, image_size=32, blocks=2, weights=path)


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("name", "extra", "features", "features_fc1"),
    [
        ("basic_cnn", {}, {"classifier.1", "classifier.4"}, {"classifier.4"}),
        ("vgg16", {}, {"classifier.0", "classifier.3", "classifier.6"}, {"classifier.3", "classifier.6"}),
        ("resnet50", {"hidden": 16}, {"fc.0", "fc.3"}, {"fc.3"}),
        ("residual_attention", {"hidden": 16}, {"fc.0", "fc.3"}, {"fc.3"}),
        ("inception_resnet_v1", {}, {"last_linear", "last_bn", "logits"}, {"logits"}),
        ("densenet121", {}, {"classifier.1"}, None),
        ("torchvision", {}, {"classifier.3"}, None),
    ],
)
def test_freeze_modes_leave_the_right_parameters_trainable(name, extra, features, features_fc1):
    everything = {n.rsplit(".", 1)[0] for n, _ in build(name, **extra).named_parameters()}
    assert _trainable(build(name, **extra, freeze="none")) == everything
    assert _trainable(build(name, **extra, freeze="features")) == features
    if features_fc1 is None:
        with pytest.raises(ValueError, match="features_fc1.*no first FC"):
            build(name, **extra, freeze="features_fc1")
    else:
        assert _trainable(build(name, **extra, freeze="features_fc1")) == features_fc1


def test_frozen_batchnorm_keeps_its_statistics_in_training():
    model = build("resnet50", freeze="features")
    model.train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 1, 32, 32) * 5 + 3).sum().backward()
    assert torch.equal(model.bn1.running_mean, before)
    assert model.conv1.weight.grad is None and model.fc[1].weight.grad is not None


def test_bad_freeze_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="model.freeze='all'; valid: none, features, features_fc1"):
        create_model("basic_cnn", num_classes=3, in_chans=1, image_size=32, blocks=2, freeze="all")


def test_unknown_torchvision_arch_lists_the_valid_names():
    with pytest.raises(ValueError, match="model.arch='resnet9000'.*valid: .*mobilenet_v3_small.*resnet18"):
        create_model("torchvision", num_classes=3, in_chans=1, image_size=32, arch="resnet9000")


@pytest.mark.parametrize(
    ("name", "size", "kwargs", "minimum"),
    [
        ("vgg16", 16, {}, 32),
        ("resnet50", 24, {}, 32),
        ("densenet121", 16, {}, 32),
        ("efficientnet_v2_s", 16, {}, 32),
        ("inception_resnet_v1", 64, {}, 75),
        ("inception_resnet_v1", 16, {"padded": True}, 32),
        ("residual_attention", 16, {"stem": "imagenet"}, 32),
        ("residual_attention", 4, {}, 8),
    ],
)
def test_too_small_images_are_a_clear_error(name, size, kwargs, minimum):
    with pytest.raises(ValueError, match=f"data.image_size={size} is too small .*at least {minimum} px"):
        create_model(name, num_classes=3, in_chans=1, image_size=size, **kwargs)


def test_too_small_images_for_a_torchvision_arch_are_a_clear_error():
    with pytest.raises(ValueError, match="data.image_size=32 does not fit torchvision model 'inception_v3'"):
        create_model("torchvision", num_classes=3, in_chans=1, image_size=32, arch="inception_v3")


def test_unknown_model_keys_are_named():
    with pytest.raises(TypeError, match="no key.*depth.*valid: dropout, hidden, zero_init_residual"):
        create_model("resnet50", num_classes=3, in_chans=1, image_size=32, depth=56)


def test_residual_attention_depths_follow_the_paper():
    def modules(depth: int) -> int:
        net = create_model(
            "residual_attention", num_classes=3, in_chans=3, image_size=224, depth=depth, width=4
        )
        return sum(type(m).__name__ == "AttentionModule" for m in net.modules())

    assert (modules(56), modules(92)) == (3, 6)
    net = create_model("residual_attention", num_classes=1000, in_chans=3, image_size=224)
    params = sum(p.numel() for p in net.parameters())
    assert math.isclose(params / 1e6, 31.9, rel_tol=0.05), (
        params
    )  # the paper's Attention-56 (ImageNet): 31.9M


def test_inception_resnet_v1_has_facenet_parameter_names():
    names = set(create_model("inception_resnet_v1", num_classes=3, in_chans=3, image_size=160).state_dict())
    for key in (
        "conv2d_1a.conv.weight",
        "conv2d_4b.bn.running_var",
        "repeat_1.4.branch2.2.conv.weight",
        "mixed_6a.branch1.2.bn.weight",
        "repeat_2.9.branch1.2.conv.weight",
        "mixed_7a.branch2.2.conv.weight",
        "repeat_3.4.conv2d.bias",
        "block8.branch1.2.conv.weight",
        "last_linear.weight",
        "last_bn.running_mean",
        "logits.weight",
    ):
        assert key in names, key
    assert "last_linear.bias" not in names


@pytest.mark.slow
def test_resnet50_trains_through_the_hydra_entry_with_weights_and_freeze(compose_cfg, tmp_path):
    weights = _save(
        create_model("resnet50", num_classes=10, in_chans=3, image_size=32).state_dict(), tmp_path / "rgb.pt"
    )
    overrides = [o for o in FAST_OVERRIDES if not o.startswith("model.")]
    cfg = compose_cfg(
        [
            *overrides,
            "model=resnet50",
            f"model.weights={weights}",
            "model.freeze=features",
            "trainer.max_epochs=1",
            "tracking=none",
        ]
    )
    results = train(cfg)
    assert results["epochs_trained"] == 1 and 0.0 <= results["test/macro_f1"] <= 1.0
    # The checkpoint holds every tensor: it loads after the initial weights file is gone.
    Path(weights).unlink()
    module = FaceClassifier.load_from_checkpoint(results["checkpoint"], map_location="cpu")
    assert module.cfg.model.weights == str(weights)
