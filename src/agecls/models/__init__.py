"""Model zoo; importing this package registers every builder.

`create_model(name, num_classes=, in_chans=, image_size=, **model_cfg)` -> logits model;
`create_backbone(name, in_chans=, image_size=, **model_cfg)` -> (trunk without its final layer, feature_dim).
"""

from agecls.models import (  # noqa: F401  (each module registers its builders)
    basic_cnn,
    inception_resnet,
    residual_attention,
    torchvision_zoo,
)
from agecls.models.parts import FREEZE_MODES, ModelParts
from agecls.models.registry import (
    available_models,
    create_backbone,
    create_model,
    register_model,
    skip_weights,
)
from agecls.models.weights import WeightsError, load_weights

__all__ = [
    "FREEZE_MODES",
    "ModelParts",
    "WeightsError",
    "available_models",
    "create_backbone",
    "create_model",
    "load_weights",
    "register_model",
    "skip_weights",
]
