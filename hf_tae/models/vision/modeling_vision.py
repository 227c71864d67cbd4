"""Multitask image classifier: a transformers vision backbone with one linear head per task.

Image domains as tasks (Grad-TAE's image setting): each example belongs to one task and has
a class label shared by all tasks. The backbone (any ``AutoModel`` vision model: ResNet,
ConvNeXt, ViT, ...) pools each image into a feature vector; with ``head="per_task"`` each
row's logits come from its own task's head, with ``head="shared"`` from one common head.

Per-example gradient capture (:mod:`hf_tae.gradients.capture`) hooks modules and needs every
hooked module to keep example ``e`` in row ``e`` of its output, so the per-task heads are
never called on a subset of rows: every head runs on the whole batch and each row gathers
its own task's logits (``T × B × C`` extra logits, negligible next to the backbone). The
heads stay plain ``nn.Linear`` modules, which the capture factorizes.

Self-contained (relative imports only, plus an optional import of hf_tae's error type in the
configuration module) so that it can be shipped as remote code next to the weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_vision import TaeError, VisionMultiTaskConfig

#: ``from_backbone`` keyword arguments that configure the classifier, not the backbone load.
_CONFIG_KWARGS: tuple[str, ...] = (
    "classifier_dropout",
    "feature_size",
    "initializer_range",
    "id2label",
    "label2id",
)
#: Regular expression of the per-task head parameters (prefix-tolerant: peft adds one).
TASK_HEAD_PATTERN = r"(?:^|\.)heads\.\d+\."


def pooled_features(outputs: Any) -> torch.Tensor:
    """``[batch, features]`` from a backbone's outputs.

    The pooler output when the backbone has one (ResNet's ``[B, C, 1, 1]`` average pool is
    flattened, ConvNeXt's ``[B, C]`` and ViT's ``[B, H]`` are used as they are), else the last
    hidden state: the first (class) token of a ``[B, T, H]`` sequence, the spatial mean of a
    ``[B, C, H, W]`` feature map. Row ``e`` only depends on example ``e``.
    """
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:
        pooled = getattr(outputs, "last_hidden_state", None)
    if pooled is None:
        pooled = outputs[0]
    if pooled.ndim == 2:
        return pooled
    if pooled.ndim == 3:
        return pooled[:, 0]
    return pooled.flatten(2).mean(-1)


def feature_width(config: VisionMultiTaskConfig, backbone_config: PreTrainedConfig) -> int:
    """Width of :func:`pooled_features`: ``config.feature_size``, else read off the backbone config.

    ``pooler_output_size`` (ViT-like poolers), ``hidden_sizes[-1]`` (ResNet, ConvNeXt: the
    last stage's channels) or ``hidden_size`` (transformers), in that order.
    """
    if config.feature_size is not None:
        return int(config.feature_size)
    size = getattr(backbone_config, "pooler_output_size", None)
    if not size and getattr(backbone_config, "hidden_sizes", None):
        size = backbone_config.hidden_sizes[-1]
    if not size:
        size = getattr(backbone_config, "hidden_size", None)
    if not size:
        raise TaeError(
            f"cannot tell the width of the pooled features of a {backbone_config.model_type!r} "
            "backbone (its config has no pooler_output_size, hidden_sizes or hidden_size); pass "
            "feature_size=<width> to VisionMultiTaskConfig."
        )
    return int(size)


class VisionMultiTaskPreTrainedModel(PreTrainedModel):
    """Weight initialization and loading conventions of the multitask vision models."""

    config_class = VisionMultiTaskConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module: nn.Module) -> None:
        """Heads: normal(0, ``initializer_range``) weights, zero biases.

        The backbone is a ``PreTrainedModel`` of its own, initialized by its own rules
        (transformers dispatches to them), so only the heads reach this method.
        """
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)


class VisionForMultiTaskImageClassification(VisionMultiTaskPreTrainedModel):
    """Vision backbone → pooled features → dropout → each example's task head (or a shared one).

    Args:
        config: the :class:`VisionMultiTaskConfig`.
        backbone: an already built backbone (e.g. with pretrained weights) to use instead of
            ``AutoModel.from_config(config.get_backbone_config())``; see :meth:`from_backbone`.

    Attributes:
        backbone: the transformers vision model.
        heads: ``nn.ModuleList`` of one ``nn.Linear(features, num_labels)`` per task
            (``head="per_task"``).
        classifier: the shared ``nn.Linear(features, num_labels)`` (``head="shared"``).
    """

    def __init__(self, config: VisionMultiTaskConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        backbone_config = config.get_backbone_config()
        if backbone is None:
            backbone = AutoModel.from_config(backbone_config)
        elif getattr(backbone.config, "model_type", None) != backbone_config.model_type:
            kind = getattr(backbone.config, "model_type", type(backbone).__name__)
            raise TaeError(
                f"backbone is a {kind!r} model but config.backbone_config describes a "
                f"{backbone_config.model_type!r} one; "
                "build the config from the backbone (backbone_config=backbone.config)."
            )
        self.backbone = backbone
        self.feature_size = feature_width(config, backbone.config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        if config.head == "per_task":
            self.heads = nn.ModuleList(
                nn.Linear(self.feature_size, config.num_labels) for _ in range(config.num_tasks)
            )
        else:
            self.classifier = nn.Linear(self.feature_size, config.num_labels)
        self.post_init()

    @property
    def supports_gradient_checkpointing(self) -> bool:  # type: ignore[override]
        """Whether the backbone supports activation checkpointing (ViT does, ResNet does not)."""
        backbone = self._modules.get("backbone")
        return bool(getattr(backbone, "supports_gradient_checkpointing", False))

    def task_head_parameter_pattern(self) -> str | None:
        """Regular expression of the task-private parameters (the per-task heads), or ``None``.

        Matches ``heads.<t>.weight`` / ``heads.<t>.bias`` also under a prefix (peft's
        ``base_model.model.``). Pass it as ``exclude=`` to gradient capture to leave the
        heads out of the shared-parameter gradients. A shared head is not task-private.
        """
        return TASK_HEAD_PATTERN if self.config.head == "per_task" else None

    @classmethod
    def from_backbone(
        cls,
        model_name_or_path: str | os.PathLike,
        task_names: list[str],
        num_labels: int | None = None,
        head: str = "per_task",
        **kwargs: Any,
    ) -> VisionForMultiTaskImageClassification:
        """A multitask classifier on pretrained backbone weights, with freshly initialized heads.

        Args:
            model_name_or_path: Hub repo id or local folder of a transformers vision model
                (a bare backbone or a classifier: ``AutoModel`` keeps the backbone).
            task_names: the tasks, in task-id order (one head each with ``head="per_task"``).
            num_labels: number of classes (or pass ``id2label``).
            head: ``"per_task"`` or ``"shared"``.
            **kwargs: ``classifier_dropout``, ``feature_size``, ``initializer_range``,
                ``id2label`` and ``label2id`` configure the classifier; everything else
                (``revision``, ``token``, ``dtype``, ``cache_dir``...) goes to
                ``AutoModel.from_pretrained``.
        """
        config_kwargs = {key: kwargs.pop(key) for key in _CONFIG_KWARGS if key in kwargs}
        if num_labels is not None:
            config_kwargs["num_labels"] = num_labels
        backbone = AutoModel.from_pretrained(model_name_or_path, **kwargs)
        config = cls.config_class(
            backbone_config=backbone.config, task_names=task_names, head=head, **config_kwargs
        )
        model = cls(config, backbone=backbone)
        reference = next(backbone.parameters())
        for name, module in model.named_children():
            if name != "backbone":
                module.to(device=reference.device, dtype=reference.dtype)
        return model

    def _task_ids(self, task: Any, batch_size: int, device: torch.device) -> torch.Tensor:
        """``[batch]`` task ids, validated against the number of heads."""
        num_tasks = self.config.num_tasks
        if task is None:
            raise TaeError(
                f"this model has one head per task ({num_tasks} tasks: "
                f"{self.config.task_names[:5]}), so forward needs task=<task id of every "
                "example> (a [batch] tensor, e.g. the batch's 'task' column); build it with "
                "head='shared' for one head for all tasks."
            )
        task = torch.as_tensor(task, device=device)
        if task.is_floating_point() or task.is_complex() or task.dtype == torch.bool:
            raise TaeError(f"task has dtype {task.dtype}; pass integer task ids (torch.long).")
        if task.ndim == 0:
            task = task.expand(batch_size)
        if task.numel() != batch_size:
            raise TaeError(
                f"task has {task.numel()} entries for a batch of {batch_size} images; pass one "
                "task id per example (or a single id for the whole batch)."
            )
        task = task.reshape(batch_size).long()
        outside = (task < 0) | (task >= num_tasks)
        if outside.any():
            bad = sorted(set(task[outside].tolist()))
            if bad[0] < 0:
                raise TaeError(
                    f"task ids {bad[:10]} are negative; task ids index task_names "
                    f"(0..{num_tasks - 1}), pass the task id of every example."
                )
            seen = bad[-1] + 1
            raise TaeError(
                f"task ids {bad[:10]} are outside 0..{num_tasks - 1}: the model has {num_tasks} "
                f"task heads but the data has at least {seen} tasks; rebuild the model with "
                f"task_names=[...] naming all {seen} tasks of the data (one head each)."
            )
        return task

    def _check_labels(self, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
        num_labels = self.config.num_labels
        if labels.numel() != batch_size or labels.is_floating_point():
            raise TaeError(
                f"labels has shape {tuple(labels.shape)} and dtype {labels.dtype}; pass one "
                f"integer class id per image ([{batch_size}] torch.long)."
            )
        labels = labels.reshape(batch_size).long()
        outside = ((labels < 0) | (labels >= num_labels)) & (labels != -100)
        if outside.any():
            bad = sorted(set(labels[outside].tolist()))
            raise TaeError(
                f"labels {bad[:10]} are outside 0..{num_labels - 1} (num_labels={num_labels}); "
                "build the model with num_labels / id2label covering every class of the data "
                "(-100 marks an ignored example)."
            )
        return labels

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        task: torch.Tensor | int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput | tuple:
        """Class logits ``[batch, num_labels]`` of images ``[batch, channels, height, width]``.

        Args:
            pixel_values: the images, as the backbone's image processor prepares them.
            labels: ``[batch]`` class ids; the loss is their cross-entropy (``-100`` ignored),
                averaged over the examples, or summed and divided by ``num_items_in_batch``
                when the Trainer passes it (gradient accumulation).
            task: ``[batch]`` task ids (or one id for the whole batch); required with per-task
                heads, ignored by a shared head.
            output_hidden_states, output_attentions: passed to the backbone when set.
            return_dict: ``False`` returns ``(loss, logits, ...)`` without ``None`` entries.
            **kwargs: ``num_items_in_batch``; other entries (extra dataset columns) are ignored.
        """
        backbone_kwargs = {
            key: value
            for key, value in (
                ("output_hidden_states", output_hidden_states),
                ("output_attentions", output_attentions),
            )
            if value is not None
        }
        outputs = self.backbone(pixel_values, return_dict=True, **backbone_kwargs)
        features = self.dropout(pooled_features(outputs))
        if features.shape[-1] != self.feature_size:
            raise TaeError(
                f"the {self.config.backbone_config['model_type']!r} backbone pools "
                f"{features.shape[-1]} features but the heads expect {self.feature_size}; set "
                f"feature_size={features.shape[-1]} in VisionMultiTaskConfig."
            )
        batch_size = features.shape[0]
        if self.config.head == "per_task":
            task_ids = self._task_ids(task, batch_size, features.device)
            every_head = torch.stack([head(features) for head in self.heads])  # [T, B, C]
            index = task_ids.view(1, batch_size, 1).expand(1, batch_size, every_head.shape[-1])
            logits = every_head.gather(0, index).squeeze(0)
        else:
            logits = self.classifier(features)

        loss = None
        if labels is not None:
            labels = self._check_labels(labels.to(logits.device), batch_size)
            low_precision = logits.dtype in (torch.float16, torch.bfloat16)
            scores = logits.float() if low_precision else logits
            num_items = kwargs.get("num_items_in_batch")
            if num_items is None:
                loss = F.cross_entropy(scores, labels, ignore_index=-100)
            else:
                loss = F.cross_entropy(scores, labels, ignore_index=-100, reduction="sum")
                loss = loss / torch.as_tensor(num_items, device=loss.device, dtype=loss.dtype)

        hidden_states = getattr(outputs, "hidden_states", None)
        attentions = getattr(outputs, "attentions", None)
        if return_dict is False:
            return tuple(v for v in (loss, logits, hidden_states, attentions) if v is not None)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions
        )


# Ships this module (and the configuration it imports relatively) as remote code; see
# configuration_vision.py.
VisionForMultiTaskImageClassification.register_for_auto_class("AutoModel")
