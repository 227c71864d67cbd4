"""Configuration of the multitask image classifier (image domains as tasks).

Self-contained (relative imports only, plus an optional import of hf_tae's error type) so
that it can be shipped as remote code next to the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

try:  # the remote-code copy of this module must also load where hf_tae is not installed
    from hf_tae.errors import TaeError
except ImportError:  # pragma: no cover - exercised by the remote-code test in a subprocess

    class TaeError(ValueError):
        """A bad input; the message names the input and the fix (hf_tae's error type)."""


#: Head kinds: one linear head per task, or one head shared by all tasks.
HEAD_KINDS: tuple[str, ...] = ("per_task", "shared")
#: Keys of a backbone config that only matter to a classifier built on it; left out of the
#: stored backbone config (a pretrained ImageNet backbone would otherwise carry 1000 labels).
_CLASSIFIER_ONLY_KEYS: tuple[str, ...] = (
    "id2label",
    "label2id",
    "architectures",
    "problem_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
)
#: Backbone of a config built without one (as transformers' UperNet does).
DEFAULT_BACKBONE: dict[str, Any] = {"model_type": "resnet"}


def backbone_config_dict(backbone_config: PreTrainedConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able form of a backbone config, validated by rebuilding it once.

    Accepts any transformers config object or a dict with ``model_type``; keeps what the
    backbone needs (``to_diff_dict``) and drops classifier-only keys.
    """
    if isinstance(backbone_config, Mapping):
        backbone_config = build_backbone_config(backbone_config)
    if not isinstance(backbone_config, PreTrainedConfig):
        raise TaeError(
            f"backbone_config is a {type(backbone_config).__name__}; pass a transformers config "
            "(e.g. ResNetConfig(), ConvNextConfig(), ViTConfig()) or a dict with its model_type."
        )
    if not backbone_config.model_type:
        raise TaeError(
            f"backbone_config {type(backbone_config).__name__} has no model_type; pass the "
            "config of a model registered with transformers' AutoModel."
        )
    stored = backbone_config.to_diff_dict()
    for key in _CLASSIFIER_ONLY_KEYS:
        stored.pop(key, None)
    stored["model_type"] = backbone_config.model_type
    return stored


def build_backbone_config(backbone_config: Mapping[str, Any]) -> PreTrainedConfig:
    """Rebuild a backbone config from its stored dict with ``AutoConfig.for_model``."""
    values = dict(backbone_config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise TaeError(
            f"backbone_config has no model_type (keys: {sorted(values)[:8]}); pass a transformers "
            "config object or a dict with e.g. model_type='resnet'."
        )
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as err:
        raise TaeError(
            f"backbone_config has model_type {model_type!r}, which transformers does not know "
            f"({err}); use a transformers vision model type such as 'resnet', 'convnext' or 'vit', "
            "or import the package that registers it first."
        ) from err


class VisionMultiTaskConfig(PreTrainedConfig):
    r"""Configuration of :class:`VisionForMultiTaskImageClassification`.

    Image domains as tasks: every example belongs to one task (its domain) and has one class
    label out of ``num_labels`` classes shared by all tasks. A transformers vision backbone
    pools each image into a feature vector and a linear head turns it into class logits: one
    head per task (``head="per_task"``, the heads being the task-private parameters) or one
    head for all tasks (``head="shared"``).

    Args:
        backbone_config: the backbone's transformers config (``ResNetConfig``,
            ``ConvNextConfig``, ``ViTConfig``, ...) or a dict with its ``model_type``; stored
            as a dict and rebuilt with ``AutoConfig.for_model`` (see :meth:`get_backbone_config`).
            Defaults to a ResNet-50-sized ``ResNetConfig()``.
        task_names: names of the tasks, in task-id order (required, at least one).
        head: ``"per_task"`` (default) or ``"shared"``.
        classifier_dropout: dropout on the pooled features before the head(s).
        feature_size: width of the pooled backbone features; ``None`` reads it from the
            backbone config (``pooler_output_size``, ``hidden_sizes[-1]`` or ``hidden_size``).
            Set it for a backbone whose config names the width otherwise.
        initializer_range: standard deviation of the heads' normal initialization.
        **kwargs: :class:`~transformers.PreTrainedConfig` arguments, notably the class names
            through ``num_labels`` / ``id2label`` / ``label2id`` (at least two classes).

    Example::

        from transformers import ResNetConfig
        config = VisionMultiTaskConfig(
            backbone_config=ResNetConfig(hidden_sizes=[64, 128], depths=[1, 1]),
            task_names=["clipart", "painting", "real"],
            num_labels=10,
        )
    """

    model_type = "hf_tae_vision_multitask"

    def __init__(
        self,
        backbone_config: PreTrainedConfig | Mapping[str, Any] | None = None,
        task_names: Sequence[str] | None = None,
        head: str = "per_task",
        classifier_dropout: float = 0.0,
        feature_size: int | None = None,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        if task_names is None or isinstance(task_names, str) or len(task_names) == 0:
            raise TaeError(
                f"task_names is {task_names!r}; pass the list of task names in task-id order, "
                "e.g. task_names=['clipart', 'painting', 'real'] (one entry per task)."
            )
        task_names = [str(name) for name in task_names]
        if len(set(task_names)) != len(task_names):
            duplicates = sorted({n for n in task_names if task_names.count(n) > 1})
            raise TaeError(f"task_names repeats {duplicates}; give every task a distinct name.")
        num_tasks = kwargs.pop("num_tasks", None)
        if num_tasks is not None and num_tasks != len(task_names):
            raise TaeError(
                f"num_tasks={num_tasks} but {len(task_names)} task_names were given; num_tasks is "
                "derived from task_names, so leave it out."
            )
        if head not in HEAD_KINDS:
            raise TaeError(
                f"head={head!r} is not a head kind; use 'per_task' (one linear head per task) or "
                "'shared' (one head for all tasks)."
            )
        if not 0.0 <= classifier_dropout < 1.0:
            raise TaeError(
                f"classifier_dropout={classifier_dropout} must be in [0, 1); use 0.0 to disable it."
            )
        if feature_size is not None and feature_size < 1:
            raise TaeError(
                f"feature_size={feature_size} must be a positive width, or None to read it from "
                "the backbone config."
            )
        self.backbone_config = backbone_config_dict(
            DEFAULT_BACKBONE if backbone_config is None else backbone_config
        )
        self.task_names = task_names
        self.head = head
        self.classifier_dropout = classifier_dropout
        self.feature_size = feature_size
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if self.num_labels is None or self.num_labels < 2:
            raise TaeError(
                f"num_labels={self.num_labels}: a classifier needs at least two classes; pass "
                "num_labels=<number of classes> or id2label={0: 'cat', 1: 'dog', ...}."
            )

    @property
    def num_tasks(self) -> int:
        """Number of tasks (one head each when ``head="per_task"``)."""
        return len(self.task_names)

    def get_backbone_config(self) -> PreTrainedConfig:
        """The backbone's transformers config, rebuilt from the stored dict."""
        return build_backbone_config(self.backbone_config)


# save_pretrained / push_to_hub write ``auto_map`` and copy this module next to the weights, so
# users without hf_tae load the model with ``AutoConfig/AutoModel...(trust_remote_code=True)``.
VisionMultiTaskConfig.register_for_auto_class()
