from .configuration_sign import SignConfig
from .modeling_sign import MultiTaskOutput, SignForMultiTaskNodeClassification, SignPreTrainedModel

__all__ = [
    "MultiTaskOutput",
    "SignConfig",
    "SignForMultiTaskNodeClassification",
    "SignPreTrainedModel",
]
