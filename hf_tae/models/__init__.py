"""PreTrainedModel wrappers; importing this package registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel

from .sign import (
    MultiTaskOutput,
    SignConfig,
    SignForMultiTaskNodeClassification,
    SignPreTrainedModel,
)

AutoConfig.register(SignConfig.model_type, SignConfig, exist_ok=True)
AutoModel.register(SignConfig, SignForMultiTaskNodeClassification, exist_ok=True)

__all__ = [
    "MultiTaskOutput",
    "SignConfig",
    "SignForMultiTaskNodeClassification",
    "SignPreTrainedModel",
]
