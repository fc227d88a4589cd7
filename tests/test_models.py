"""The model registry and the dissertation's basic CNN."""

from __future__ import annotations

import pytest
import torch

from agecls.models import available_models, create_model


@pytest.mark.parametrize(("blocks", "in_chans", "size"), [(1, 1, 32), (3, 3, 64), (4, 1, 64), (5, 1, 64)])
def test_basic_cnn_shapes_and_backward(blocks, in_chans, size):
    model = create_model(
        "basic_cnn", num_classes=7, in_chans=in_chans, image_size=size, blocks=blocks, base_channels=4
    )
    out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_basic_cnn_is_the_seed_architecture():
    model = create_model(
        "basic_cnn", num_classes=7, in_chans=1, image_size=224, blocks=4, base_channels=64, hidden=132
    )
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    block = model.features[0]
    assert [type(m).__name__ for m in block] == ["Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"]
    fcs = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert (fcs[0].in_features, fcs[0].out_features, fcs[1].out_features) == (512 * 14 * 14, 132, 7)
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.6]


def test_dropout_placement_blocks_adds_spatial_dropout():
    model = create_model("basic_cnn", num_classes=3, in_chans=1, image_size=32, blocks=2, dropout_at="blocks")
    kinds = [type(m).__name__ for m in model.modules() if "Dropout" in type(m).__name__]
    assert kinds.count("Dropout2d") == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blocks": 6}, "between 1 and 5"),
        ({"dropout_at": "middle"}, "valid: output, blocks, both, none"),
        ({"blocks": 3, "image_size": 36}, "divisible by 2\\*\\*model.blocks=8"),
    ],
)
def test_bad_model_config_names_the_key(kwargs, message):
    args = {"num_classes": 3, "in_chans": 1, "image_size": 32} | kwargs
    with pytest.raises(ValueError, match=message):
        create_model("basic_cnn", **args)


def test_unknown_model_lists_valid_names():
    assert "basic_cnn" in available_models()
    with pytest.raises(KeyError, match="valid: .*basic_cnn"):
        create_model("resnet9000", num_classes=2, in_chans=1, image_size=32)
