"""PreTrainedModel wrappers; importing this package registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .sign import (
    MultiTaskOutput,
    SignConfig,
    SignForMultiTaskNodeClassification,
    SignPreTrainedModel,
)
from .vision import (
    VisionForMultiTaskImageClassification,
    VisionMultiTaskConfig,
    VisionMultiTaskPreTrainedModel,
)

#: Hub task tag (``pipeline_tag`` of model cards) of each hf_tae model type.
PIPELINE_TAGS: dict[str, str] = {
    SignConfig.model_type: "graph-ml",
    VisionMultiTaskConfig.model_type: "image-classification",
}

AutoConfig.register(SignConfig.model_type, SignConfig, exist_ok=True)
AutoModel.register(SignConfig, SignForMultiTaskNodeClassification, exist_ok=True)
AutoConfig.register(VisionMultiTaskConfig.model_type, VisionMultiTaskConfig, exist_ok=True)
AutoModel.register(VisionMultiTaskConfig, VisionForMultiTaskImageClassification, exist_ok=True)
AutoModelForImageClassification.register(
    VisionMultiTaskConfig, VisionForMultiTaskImageClassification, exist_ok=True
)

__all__ = [
    "PIPELINE_TAGS",
    "MultiTaskOutput",
    "SignConfig",
    "SignForMultiTaskNodeClassification",
    "SignPreTrainedModel",
    "VisionForMultiTaskImageClassification",
    "VisionMultiTaskConfig",
    "VisionMultiTaskPreTrainedModel",
]
