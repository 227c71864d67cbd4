"""Per-example scalar scores s_e(θ) whose gradients Grad-TAE projects.

A score function maps a model's outputs and the batch to one scalar per example, each
depending on its own example only. Three families cover the paper's settings:

* :class:`TaskLogitScore`: multi-label models (graph communities); the logit of the
  example's own task.
* :class:`GoldLogOddsScore`: classifiers (images); the log-odds of the gold class.
* :class:`TokenLogOddsScore`: seq2seq and causal LMs (instructions); the gold-token log-odds
  averaged over target tokens, or the first target token only, as in the paper.

Log-odds are computed as ``z_y - logsumexp_{c != y} z_c``, which equals ``log p/(1-p)``
exactly and stays finite as p → 1 (the reference code's ``log(p/(1-p))`` is inf there).
The clamp policy is explicit: ``clamp=None`` (default) never clamps; a number
``c`` clamps scores to ``[-c, c]``, which bounds the linearization (the reference code
instead shifts p by 1e-3, roughly ``clamp=6.9``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ScoreFunction(Protocol):
    """What a score function provides: a call returning ``[batch]`` scores and a JSON-able config."""

    name: str

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


def gold_log_odds(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``log p_gold / (1 - p_gold)`` over the last dimension, computed without forming p."""
    gold = gold.long().unsqueeze(-1)
    gold_logit = logits.gather(-1, gold).squeeze(-1)
    others = logits.scatter(-1, gold, float("-inf"))
    return gold_logit - torch.logsumexp(others, dim=-1)


class _Score:
    name = "score"

    def __init__(self, clamp: float | None = None):
        if clamp is not None and clamp <= 0:
            raise ValueError(f"clamp must be positive or None, got {clamp}.")
        self.clamp = clamp

    def _finish(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.clamp is None else scores.clamp(-self.clamp, self.clamp)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "clamp": self.clamp}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _logits(outputs: Any) -> torch.Tensor:
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits


class TaskLogitScore(_Score):
    """The logit of each example's own task, ``logits[e, task[e]]`` (Grad-TAE graph setting).

    The batch must carry ``task`` (global task id of each example).
    """

    name = "task_logit"

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "task" not in batch:
            raise ValueError("TaskLogitScore needs batch['task'] (the task id of every example).")
        logits = _logits(outputs)
        return self._finish(logits.gather(1, batch["task"].long().view(-1, 1)).squeeze(1))


class GoldLogOddsScore(_Score):
    """Log-odds of the gold class of a classifier, from ``batch[label_key]``."""

    name = "gold_log_odds"

    def __init__(self, label_key: str = "labels", clamp: float | None = None):
        super().__init__(clamp)
        self.label_key = label_key

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._finish(gold_log_odds(_logits(outputs), batch[self.label_key]))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "label_key": self.label_key}


class TokenLogOddsScore(_Score):
    """Gold-token log-odds of a language model, averaged over each example's target tokens.

    Targets are ``batch["labels"]`` with ``-100`` on ignored positions (HF convention). For a
    causal LM (``shift=True``) position t predicts token t + 1, as in the HF loss; for a
    seq2seq model the decoder logits align with the labels (``shift=False``).
    ``first_token=True`` scores only the first target token (the Grad-TAE text setting).
    """

    name = "token_log_odds"

    def __init__(
        self,
        shift: bool,
        first_token: bool = False,
        ignore_index: int = -100,
        clamp: float | None = None,
    ):
        super().__init__(clamp)
        self.shift, self.first_token, self.ignore_index = shift, first_token, ignore_index

    @classmethod
    def for_model(cls, model: torch.nn.Module, **kwargs: Any) -> TokenLogOddsScore:
        """Pick ``shift`` from the model config (encoder-decoder: no shift)."""
        config = getattr(model, "config", None)
        return cls(shift=not getattr(config, "is_encoder_decoder", False), **kwargs)

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits, labels = _logits(outputs), batch["labels"]
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        valid = labels != self.ignore_index
        if self.first_token:
            first = valid.long().cumsum(1) == 1
            valid = valid & first
        if not valid.any(dim=1).all():
            empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(
                f"examples at batch positions {empty} have no target token (all labels are {self.ignore_index})."
            )
        token_scores = gold_log_odds(logits, labels.clamp_min(0))
        token_scores = torch.where(valid, token_scores, torch.zeros_like(token_scores))
        return self._finish(token_scores.sum(1) / valid.sum(1))

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "shift": self.shift,
            "first_token": self.first_token,
            "ignore_index": self.ignore_index,
        }


#: Score of each hf_tae model type when none is given: multi-label models (one logit per task)
#: score a task's own logit, classifiers the gold class's log-odds.
DEFAULT_SCORES = {"tae_sign": TaskLogitScore, "hf_tae_vision_multitask": GoldLogOddsScore}


def default_score_function(model: torch.nn.Module) -> ScoreFunction:
    """The score function of an hf_tae model (:data:`DEFAULT_SCORES`); other models must name
    theirs, since a wrong default would silently differentiate the wrong quantity."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_SCORES:
        raise ValueError(
            f"no default score function for model type {model_type!r}; pass score_fn= "
            "(e.g. TaskLogitScore() for one logit per task, GoldLogOddsScore() for classifiers, "
            "TokenLogOddsScore.for_model(model) for language models)."
        )
    return DEFAULT_SCORES[model_type]()
