from .configuration_vision import VisionMultiTaskConfig
from .modeling_vision import (
    VisionForMultiTaskImageClassification,
    VisionMultiTaskPreTrainedModel,
    pooled_features,
)

__all__ = [
    "VisionForMultiTaskImageClassification",
    "VisionMultiTaskConfig",
    "VisionMultiTaskPreTrainedModel",
    "pooled_features",
]
