"""Decoupled SIGN model with one logit per task (the graph model of Grad-TAE's code).

Each hop's precomputed features ``Â^k X`` go through their own MLP; the hop outputs are
concatenated and a shared MLP head emits one logit per task. The loss is binary
cross-entropy averaged over the (node, task) pairs selected by ``label_mask``, so one model
serves any subset of tasks. Self-contained (relative imports only) so that it can be shipped
as remote code next to the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_sign import SignConfig


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of a multitask model: masked loss (when labels are given) and per-task logits."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


def masked_bce_with_logits(
    logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean binary cross-entropy over the selected (node, task) pairs.

    Equals the reference's per-task losses weighted by their mask counts and divided by the
    total count; a batch with no selected pair contributes a zero loss that keeps the graph.
    """
    losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    if label_mask is None:
        return losses.mean()
    mask = label_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1.0)


def _mlp(
    in_size: int, hidden: int, out_size: int, num_layers: int, dropout: float
) -> nn.Sequential:
    sizes = [in_size] + [hidden] * (num_layers - 1) + [out_size]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers += [nn.PReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class SignPreTrainedModel(PreTrainedModel):
    config_class = SignConfig
    base_model_prefix = "sign"
    main_input_name = "hop_features"
    # the loss is a mean over the batch's selected pairs and ignores num_items_in_batch, so the
    # Trainer must scale it under gradient accumulation itself
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.PReLU):
            nn.init.constant_(module.weight, 0.25)


class SignForMultiTaskNodeClassification(SignPreTrainedModel):
    """SIGN_MLP: per-hop MLPs → concat → PReLU/dropout → MLP head with ``num_tasks`` logits."""

    def __init__(self, config: SignConfig):
        super().__init__(config)
        h = config.hidden_size
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.hops = nn.ModuleList(
            _mlp(config.in_features, h, h, config.num_mlp_layers, config.dropout)
            for _ in range(config.num_hops + 1)
        )
        self.act = nn.PReLU()
        self.dropout = nn.Dropout(config.dropout)
        self.head = _mlp(
            h * (config.num_hops + 1), h, config.num_tasks, config.num_mlp_layers, config.dropout
        )
        self.post_init()

    def forward(
        self,
        hop_features: torch.Tensor,
        labels: torch.Tensor | None = None,
        label_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MultiTaskOutput | tuple:
        """Logits ``[batch, num_tasks]`` for hop features ``[batch, num_hops + 1, in_features]``."""
        cfg = self.config
        expected = (cfg.num_hops + 1, cfg.in_features)
        if hop_features.ndim != 3 or tuple(hop_features.shape[1:]) != expected:
            raise ValueError(
                f"hop_features has shape {tuple(hop_features.shape)}, expected [batch, {expected[0]}, {expected[1]}] "
                f"(num_hops={cfg.num_hops}, in_features={cfg.in_features}); recompute the features with the "
                "model's num_hops or load a model configured for these features."
            )
        x = self.input_dropout(hop_features)
        hidden = torch.cat([mlp(x[:, k]) for k, mlp in enumerate(self.hops)], dim=-1)
        logits = self.head(self.dropout(self.act(hidden)))
        loss = None
        if labels is not None:
            for name, tensor in (("labels", labels), ("label_mask", label_mask)):
                if tensor is not None and tensor.shape != logits.shape:
                    raise ValueError(
                        f"{name} has shape {tuple(tensor.shape)} but the model predicts {tuple(logits.shape)} "
                        f"(num_tasks={cfg.num_tasks}); build the model with num_tasks equal to the label matrix "
                        "width, or select the matching task columns."
                    )
            loss = masked_bce_with_logits(logits, labels, label_mask)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return MultiTaskOutput(loss=loss, logits=logits)


# Ships this module (and the configuration it imports relatively) as remote code; see
# configuration_sign.py.
SignForMultiTaskNodeClassification.register_for_auto_class("AutoModel")
