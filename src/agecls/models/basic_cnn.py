"""The dissertation's basic CNN, written as a loop over blocks rather than five hand-copied ones."""

from __future__ import annotations

from torch import nn

from agecls.models.parts import ModelParts
from agecls.models.registry import register_model

DROPOUT_PLACES = ("output", "blocks", "both", "none")


def conv_block(in_ch: int, out_ch: int, dropout: float) -> nn.Sequential:
    """conv3x3 -> ReLU -> BatchNorm -> MaxPool2 (the seed's order), optional dropout after."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(out_ch),
        nn.MaxPool2d(2),
    ]
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class BasicCNN(nn.Module):
    """`blocks` conv blocks with doubling channels, then fc(hidden) -> ReLU -> Dropout -> fc(classes).

    freeze=features trains only `classifier` (fc1 and fc2); features_fc1 trains only fc2 (`classifier.4`)."""

    zoo_parts = ModelParts(
        stem=("input_norm", "features.0.0"),
        head=("classifier",),
        fc1=("classifier.1",),
        new=("classifier.4",),
        last="classifier.4",
    )

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int,
        blocks: int = 4,
        base_channels: int = 64,
        hidden: int = 132,
        dropout: float = 0.6,
        dropout_at: str = "output",
        input_norm: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= blocks <= 5:
            raise ValueError(f"model.blocks={blocks} must be between 1 and 5")
        if dropout_at not in DROPOUT_PLACES:
            raise ValueError(f"model.dropout_at={dropout_at!r}; valid: {', '.join(DROPOUT_PLACES)}")
        if image_size % (2**blocks):
            raise ValueError(f"data.image_size={image_size} must be divisible by 2**model.blocks={2**blocks}")
        block_dropout = dropout if dropout_at in ("blocks", "both") else 0.0
        out_dropout = dropout if dropout_at in ("output", "both") else 0.0
        self.input_norm = nn.BatchNorm2d(in_chans) if input_norm else nn.Identity()
        chans = [in_chans] + [base_channels * 2**i for i in range(blocks)]
        pairs = zip(chans[:-1], chans[1:], strict=True)
        self.features = nn.Sequential(*(conv_block(a, b, block_dropout) for a, b in pairs))
        side = image_size // 2**blocks
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(chans[-1] * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(out_dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(self.input_norm(x)))


@register_model("basic_cnn")
def basic_cnn(num_classes: int, in_chans: int, image_size: int, **kwargs) -> BasicCNN:
    """Registry builder for `model=basic_cnn`."""
    return BasicCNN(num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
