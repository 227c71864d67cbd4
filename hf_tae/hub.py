"""Publish Grad-TAE artifacts to the Hugging Face Hub and load meta-initializations back.

A meta-initialization θ0 is only useful next to what was derived from it (its projected
gradients, the task data, the affinity matrix), so this module publishes them as linked
repos and writes a model card that says which tasks θ0 was trained on, how well it does on each,
and how to load it with or without hf_tae. Safety rules, everywhere in this module: weights are
read and written as safetensors only (pickled files such as ``training_args.bin`` are never
published), remote code runs only when the caller passes ``trust_remote_code=True``, and the
Hub token never ends up in a card or a message.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS
from hf_tae.utils.io import artifact_source, prepare_repo

if TYPE_CHECKING:
    import torch
    from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

__all__ = [
    "CARD_TAGS",
    "card_metrics",
    "card_training_arguments",
    "load_meta_init",
    "meta_init_card",
    "publish",
]

#: Tags of every meta-initialization card (plus ``transformers``: the model is a transformers model).
CARD_TAGS: tuple[str, ...] = ("hf-tae", "multitask", "task-affinity")
#: Per-task metrics of :class:`~hf_tae.MultiLabelTaskMetrics` shown in the card, in column order.
CARD_METRICS: tuple[str, ...] = METRICS
#: Training arguments worth reproducing a run; never anything secret (no ``hub_token``).
CARD_TRAINING_ARGUMENTS: tuple[str, ...] = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "optim",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
    "tasks",
    "task_balanced_sampling",
    "decision_threshold",
    "metric_for_best_model",
)
#: Files of a saved model folder that :func:`publish` uploads (weights as safetensors only).
MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "*.json",
    "*.safetensors",
    "*.py",
    "*.txt",
    "*.model",
    "*.jinja",
    "README.md",
)

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MODEL_CONFIG = "config.json"
_RUN_RESULTS = "results.json"
_METRIC_PREFIXES = {"eval": "validation", "test": "test"}  # Trainer key prefix -> split name
_TEMPLATE = "meta_init_card.md"


# ---------------------------------------------------------------------------------- model card
def card_metrics(log_history: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The latest value of every numeric entry of ``trainer.state.log_history``.

    Later logs win, so the result holds the last evaluation of each split (``eval_*`` from
    training, ``test_*`` from ``evaluate_tasks("test")``) next to the last training loss.
    """
    latest: dict[str, float] = {}
    for log in log_history:
        for key, value in log.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                latest[key] = float(value)
    return latest


def card_training_arguments(args: Any) -> dict[str, Any]:
    """The :data:`CARD_TRAINING_ARGUMENTS` of a ``TrainingArguments`` that are set, plus the world size."""
    values: dict[str, Any] = {}
    for name in CARD_TRAINING_ARGUMENTS:
        value = getattr(args, name, None)
        if value is None or (name == "max_steps" and value <= 0):
            continue
        values[name] = getattr(value, "value", value)  # enums (optim, scheduler) as their string
    values["world_size"] = getattr(args, "world_size", 1)
    return values


@dataclass(frozen=True)
class _Link:
    label: str
    repo_id: str
    url: str


def _dataset_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/datasets/{repo_id}"


def _metric_rows(
    task_names: list[str], metrics: Mapping[str, float]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Card table rows ``{task, split, cells}`` per (split, task) that has metrics, plus averages."""
    names = [m for m in CARD_METRICS if any(k.endswith(f"_{m}") for k in metrics)]
    rows = []
    for prefix, split in _METRIC_PREFIXES.items():
        for task, label in [(t, f"`{t}`") for t in task_names] + [("avg", "**average**")]:
            values = [metrics.get(f"{prefix}_{task}_{m}") for m in names]
            if any(v is not None for v in values):
                shown = ["–" if v is None else f"{v:.4f}" for v in values]
                rows.append({"task": label, "split": split, "cells": shown})
    return names, rows


def _eval_results(
    task_names: list[str], metrics: Mapping[str, float], task_type: str, dataset: str | None
) -> list[Any]:
    """``EvalResult`` per task, split and metric (F1, accuracy): the card's ``model-index``.

    Each task is its own ``dataset_config`` so that the Hub (which groups results by task type,
    dataset, config and split) keeps one entry per task.
    """
    from huggingface_hub import EvalResult

    results = []
    for prefix, split in _METRIC_PREFIXES.items():
        for task in task_names:
            for metric in ("f1", "accuracy"):
                value = metrics.get(f"{prefix}_{task}_{metric}")
                if value is None:
                    continue
                results.append(
                    EvalResult(
                        task_type=task_type,
                        task_name=task,
                        dataset_type=dataset or "hf-tae/task-set",
                        dataset_name=dataset or "Grad-TAE task set",
                        dataset_config=task,
                        dataset_split=split,
                        metric_type=metric,
                        metric_name=f"{task} {metric}",
                        metric_value=round(value, 6),
                    )
                )
    return results


def _without_tokens(text: str, extra_tokens: Iterable[str | None] = ()) -> str:
    """``text`` with the active Hub token (and ``extra_tokens``) replaced by ``<redacted>``."""
    from huggingface_hub import get_token

    for token in {get_token(), *extra_tokens}:
        if token:
            text = text.replace(token, "<redacted>")
    return text


def meta_init_card(
    repo_id: str,
    task_names: Iterable[str],
    *,
    metrics: Mapping[str, float] | None = None,
    training_arguments: Mapping[str, Any] | None = None,
    architecture: str = "PreTrainedModel",
    model_type: str | None = None,
    remote_code: bool = False,
    model_name: str | None = None,
    tags: Iterable[str] = (),
    license: str | None = None,
    data_repo: str | None = None,
    gradient_store_repo: str | None = None,
    affinity_repo: str | None = None,
    metric_source: str | None = None,
    secrets: Iterable[str | None] = (),
) -> ModelCard:
    """The model card of a meta-initialization (template ``hf_tae/templates/meta_init_card.md``).

    Args:
        repo_id: the model repo, used in the loading examples.
        task_names: the tasks the model was trained on.
        metrics: flat Trainer metrics (``eval_<task>_f1``, ``test_<task>_accuracy``, ...); per-task
            values become a table and ``model-index`` results.
        training_arguments: shown as a table (see :func:`card_training_arguments`).
        architecture / model_type: the model class and its ``config.model_type``.
        remote_code: whether the repo ships the model code (``auto_map``), so the card shows
            how to load it with ``trust_remote_code=True`` without hf_tae.
        data_repo / gradient_store_repo / affinity_repo: dataset repos to link (and to list as
            the card's ``datasets``), e.g. the outputs of :func:`publish` on a run folder.
        metric_source: where the metrics come from, shown next to the table.
        secrets: strings to redact besides the active Hub token (e.g. ``args.hub_token``).

    Metadata: ``library_name: hf_tae``, tags :data:`CARD_TAGS` + ``transformers`` + ``tags``.
    """
    import huggingface_hub
    import torch
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    import hf_tae

    task_names = [str(t) for t in task_names]
    metrics = dict(metrics or {})
    model_name = model_name or repo_id.split("/")[-1]
    pipeline_tag = _pipeline_tag(model_type)
    task_type = pipeline_tag or "other"
    links = [
        _Link(label, repo, _dataset_url(repo))
        for label, repo in (
            ("Task data", data_repo),
            ("Gradient store (projected per-example gradients at θ0)", gradient_store_repo),
            ("Task affinity", affinity_repo),
        )
        if repo
    ]
    all_tags = list(dict.fromkeys([*CARD_TAGS, "transformers", *tags]))
    card_data = ModelCardData(
        library_name="hf_tae",
        license=license,
        tags=all_tags,
        model_name=model_name,
        datasets=[link.repo_id for link in links] or None,
        pipeline_tag=pipeline_tag,
        eval_results=_eval_results(task_names, metrics, task_type, data_repo) or None,
    )
    metric_names, metric_rows = _metric_rows(task_names, metrics)
    template = resources.files("hf_tae") / "templates" / _TEMPLATE
    card = ModelCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        model_name=model_name,
        repo_id=repo_id,
        architecture=architecture,
        remote_code=remote_code,
        task_names=task_names,
        metric_names=metric_names,
        metric_rows=metric_rows,
        metric_source=metric_source,
        links=links,
        training_rows=sorted((training_arguments or {}).items()),
        versions=[
            ("hf_tae", hf_tae.__version__),
            ("transformers", transformers.__version__),
            ("PyTorch", torch.__version__),
            ("huggingface_hub", huggingface_hub.__version__),
        ],
    )
    return ModelCard(_without_tokens(card.content, secrets))


# ---------------------------------------------------------------------------------- loading
def _describe(source: str, revision: str | None) -> str:
    return f"{source!r}" + (f" at revision {revision!r}" if revision else "")


def _has_file(source: str, filename: str, revision: str | None, token: Any = None) -> bool:
    """Whether the folder or Hub model repo ``source`` holds ``filename`` (downloading it).

    Missing repos and revisions raise :class:`TaeError` with the fix; a missing file is ``False``.
    """
    if Path(source).is_dir():
        return (Path(source) / filename).is_file()
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        hf_hub_download(source, filename, revision=revision, token=token)
    except RevisionNotFoundError as err:
        raise TaeError(
            f"the Hub model repo {source!r} has no revision {revision!r}; pass one of its "
            "branches, tags or commit shas (HfApi().list_repo_refs / list_repo_commits list them)."
        ) from err
    except RepositoryNotFoundError as err:
        raise TaeError(
            f"the Hub model repo {source!r} does not exist or your token cannot read it; check "
            "the repo id (a local folder must exist), or log in (`hf auth login`) for a private "
            "repo."
        ) from err
    except EntryNotFoundError:
        return False
    return True


def _model_class(config: Any) -> Any:
    """The transformers class the model was saved as (``architectures``), else ``AutoModel``.

    Keeps task heads (``GPT2LMHeadModel`` rather than the bare ``GPT2Model``); hf_tae's own and
    remote-code models resolve through ``AutoModel`` (registered / ``auto_map``).
    """
    import transformers

    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    return cls if hasattr(cls, "from_pretrained") else transformers.AutoModel


def _load_full_model(
    source: str, revision: str | None, trust_remote_code: bool, kwargs: dict[str, Any]
) -> torch.nn.Module:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=revision,
                                            trust_remote_code=trust_remote_code,
                                            token=kwargs.get("token"))  # fmt: skip
    except ValueError as err:
        if "does not recognize this architecture" not in str(err):
            raise
        raise TaeError(
            f"the model type of {_describe(source, revision)} is not registered with transformers' "
            "Auto classes. A model defined outside hf_tae and transformers (e.g. a family's own) "
            "registers itself before it is loaded back: AutoConfig.register(model_type, "
            "ConfigClass) and AutoModel.register(ConfigClass, ModelClass)."
        ) from err
    model_cls = _model_class(config)
    if model_cls.__name__.startswith("Auto"):
        kwargs = {"trust_remote_code": trust_remote_code, **kwargs}
    return model_cls.from_pretrained(
        source, config=config, revision=revision, use_safetensors=True, **kwargs
    )


def _load_adapter(
    source: str, revision: str | None, trust_remote_code: bool, kwargs: dict[str, Any]
) -> torch.nn.Module:
    """Base model (loaded like a full model) + the peft adapter, with the adapter trainable."""
    from peft import PeftConfig, PeftModel

    token = kwargs.get("token")
    if not _has_file(source, _ADAPTER_WEIGHTS, revision, token):
        raise TaeError(
            f"the peft adapter {_describe(source, revision)} has no {_ADAPTER_WEIGHTS}; hf_tae "
            "loads safetensors only: re-save the adapter with peft's save_pretrained / "
            "push_to_hub (safetensors is their default) and push it again."
        )
    peft_config = PeftConfig.from_pretrained(source, revision=revision, token=token)
    base_source = peft_config.base_model_name_or_path
    if not base_source:
        raise TaeError(
            f"the adapter config of {_describe(source, revision)} names no base model "
            "(base_model_name_or_path); set it to the base model's repo id and push again."
        )
    base = load_meta_init(base_source, peft_config.revision, trust_remote_code, **kwargs)
    return PeftModel.from_pretrained(
        base, source, revision=revision, is_trainable=True, token=token
    )


def load_meta_init(
    repo_id_or_path: str | os.PathLike,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a meta-initialization from a Hub model repo or a local folder, ready for gradients.

    A full model (``config.json``) loads as the class it was saved as, or through ``AutoModel``
    (hf_tae's models are registered with it). A peft adapter (``adapter_config.json``) loads its
    base model the same way and the adapter on top with ``is_trainable=True``, so gradient
    capture sees the LoRA parameters (the base stays frozen). The model is returned in eval
    mode (no dropout: gradients at θ0 are deterministic).

    Args:
        repo_id_or_path: ``"user/name"`` on the Hub, or a folder written by ``save_pretrained``.
        revision: branch, tag or commit sha to pin (Hub repos only).
        trust_remote_code: run model code shipped in the repo; off unless you trust the repo.
        **kwargs: passed to the model's ``from_pretrained`` (e.g. ``dtype``, ``device_map``);
            ``token`` is also used for the repo's config and adapter files.

    Raises:
        TaeError: the repo, revision or model files do not exist, or the weights are not
            safetensors.
    """
    source = artifact_source(repo_id_or_path, revision)
    from huggingface_hub.errors import EntryNotFoundError

    token = kwargs.get("token")
    try:
        if _has_file(source, _ADAPTER_CONFIG, revision, token):
            model = _load_adapter(source, revision, trust_remote_code, kwargs)
        elif _has_file(source, _MODEL_CONFIG, revision, token):
            model = _load_full_model(source, revision, trust_remote_code, kwargs)
        else:
            raise TaeError(
                f"{_describe(source, revision)} holds neither {_MODEL_CONFIG} (a saved model) nor "
                f"{_ADAPTER_CONFIG} (a peft adapter); push the model first with "
                "trainer.push_to_hub(), model.push_to_hub() or hf_tae.hub.publish()."
            )
    except (EntryNotFoundError, OSError) as err:  # transformers reports missing weights as OSError
        raise TaeError(
            f"could not load the model files of {_describe(source, revision)}: {err}. The folder "
            "or repo must hold the files save_pretrained writes, with safetensors weights."
        ) from err
    return model.eval()


def _pipeline_tag(model_type: str | None) -> str | None:
    """The Hub task tag of an hf_tae model type (``graph-ml``, ``image-classification``…)."""
    from hf_tae.models import PIPELINE_TAGS

    return PIPELINE_TAGS.get(model_type)


# ---------------------------------------------------------------------------------- publishing
#: Saved task-data folders: the file that marks one, and the class that loads and pushes it.
#: The first entry whose paths all exist in a folder names its class; text tasks saved with
#: their tokenizer (a text run's ``data/``) come before plain ones, so the tokenizer travels.
_DATA_FOLDERS = (
    (("graph_info.json",), "hf_tae.families.graph.data", "CommunityGraph"),
    (("image_domains.json",), "hf_tae.families.image.domains", "ImageDomains"),
    (("text_tasks.json", "tokenizer"), "hf_tae.families.text.tokenization", "TokenizedTextTasks"),
    (("text_tasks.json",), "hf_tae.families.text.data", "TextTasks"),
)


def _data_class(folder: Path):
    """The class of the task data saved in ``folder`` (None when it holds none)."""
    import importlib

    for paths, module, name in _DATA_FOLDERS:
        if all((folder / p).exists() for p in paths):
            return getattr(importlib.import_module(module), name)
    return None


def load_task_data(path: str | os.PathLike):
    """The task data a run saved in ``data/`` (a :class:`~hf_tae.CommunityGraph`, an
    :class:`~hf_tae.ImageDomains`, …), whatever its family."""
    folder = Path(path)
    cls = _data_class(folder)
    if cls is None:
        raise TaeError(
            f"{str(folder)!r} holds no saved task data: expected one of "
            f"{sorted({paths[0] for paths, _, _ in _DATA_FOLDERS})}."
        )
    return cls.load(folder)


def _detect(folder: Path) -> str:
    """What an artifact folder holds: ``run``, ``model``, ``gradients`` or ``data``."""
    from hf_tae.gradients.store import INFO_FILE as STORE_INFO

    if not folder.is_dir():
        raise TaeError(f"{str(folder)!r} is not a folder; pass the folder of a saved artifact.")
    if (folder / "meta_init" / _MODEL_CONFIG).is_file():
        return "run"
    if (folder / _MODEL_CONFIG).is_file() or (folder / _ADAPTER_CONFIG).is_file():
        return "model"
    if (folder / STORE_INFO).is_file():
        return "gradients"
    if _data_class(folder) is not None:
        return "data"
    raise TaeError(
        f"{str(folder)!r} is not an hf_tae artifact: expected config.json or adapter_config.json "
        "(a saved model), gradient_store.json (a GradientStore), graph_info.json, "
        "image_domains.json or text_tasks.json (saved task data) or a run folder of hf-tae run "
        "(meta_init/, data/, gradients/)."
    )


def _publish_model(
    folder: Path,
    repo_id: str,
    revision: str | None,
    private: bool | None,
    commit_message: str | None,
    links: Mapping[str, str | None],
    metrics: Mapping[str, float] | None,
) -> str:
    """One commit with the folder's :data:`MODEL_FILE_PATTERNS` files and a model card.

    The folder's own ``README.md`` is kept unless there are repos to link; then, or when the
    folder has no card, a :func:`meta_init_card` is committed (the folder is not modified).
    """
    from huggingface_hub import CommitOperationAdd

    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_FILE_PATTERNS)
    )
    weights = {"model.safetensors", "model.safetensors.index.json", _ADAPTER_WEIGHTS}
    if not weights & {p.name for p in files}:
        raise TaeError(
            f"{str(folder)!r} has no safetensors weights ({', '.join(sorted(weights))}); hf_tae "
            "publishes safetensors only: re-save the model with save_pretrained()."
        )
    skipped = sorted(p.name for p in folder.iterdir() if p.is_file() and p not in files)
    if skipped:
        logger.info("not publishing %s (not model files, or not safetensors)", ", ".join(skipped))
    operations = [CommitOperationAdd(p.name, str(p)) for p in files]
    if any(links.values()) or not (folder / "README.md").is_file():
        config = (
            json.loads((folder / _MODEL_CONFIG).read_text())
            if (folder / _MODEL_CONFIG).is_file()
            else {}
        )
        card = meta_init_card(
            repo_id,
            config.get("task_names") or [],
            metrics=metrics,
            architecture=(config.get("architectures") or ["PreTrainedModel"])[0],
            model_type=config.get("model_type"),
            remote_code="auto_map" in config,
            metric_source="results.json of the run" if metrics else None,
            **links,
        )
        operations = [op for op in operations if op.path_in_repo != "README.md"]
        operations.append(CommitOperationAdd("README.md", str(card).encode()))
    return prepare_repo(repo_id, "model", revision=revision, private=private).create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload meta-initialization with hf_tae",
        revision=revision,
    )


def _publish_gradients(
    folder: Path, repo_id: str, revision: str | None, private: bool | None, message: str | None
) -> str:
    from hf_tae.gradients.store import GradientStore

    store = GradientStore.load(folder)
    kwargs = {"commit_message": message} if message else {}
    return store.push_to_hub(repo_id, private=private, revision=revision, **kwargs)


def _publish_data(
    folder: Path, repo_id: str, revision: str | None, private: bool | None, message: str | None
) -> str:
    data = load_task_data(folder)  # its push_to_hub creates the repo and the branch
    kwargs = {"commit_message": message} if message else {}
    return data.push_to_hub(repo_id, private=private, revision=revision, **kwargs)


def _run_metrics(run_dir: Path) -> dict[str, float]:
    """The meta-initialization's validation and test metrics from a run's ``results.json``
    (empty if absent)."""
    path = run_dir / _RUN_RESULTS
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text()).get("meta_init", {})
    merged = {**meta.get("validation", {}), **meta.get("test", {})}
    return {k: float(v) for k, v in merged.items() if isinstance(v, int | float)}


def publish(
    artifact_dir: str | os.PathLike,
    repo_id: str,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
) -> dict[str, str]:
    """Publish an hf_tae artifact folder to the Hub; returns ``{kind: commit URL}``.

    What is published depends on the folder:

    * a saved model (``config.json``, or a peft ``adapter_config.json``) → model repo
      ``repo_id``: config, safetensors weights, remote-code modules, tokenizer files and a card;
    * a :class:`~hf_tae.GradientStore` (``gradient_store.json``) → dataset repo ``repo_id``;
    * saved task data (a :class:`~hf_tae.CommunityGraph`'s ``graph_info.json``, an
      :class:`~hf_tae.ImageDomains`' ``image_domains.json``, text tasks' ``text_tasks.json``
      with their ``tokenizer/`` when the folder has one) → dataset repo ``repo_id``;
    * a run folder of ``hf-tae run`` or a recipe (``meta_init/``, ``data/``,
      ``gradients/``) → the data to ``<repo_id>-data``, the gradients to
      ``<repo_id>-gradients`` and the model to ``repo_id`` with a card linking both and showing
      the metrics of ``results.json``.

    Keys of the result: ``model``, ``data``, ``gradients`` (those published). Each value is the
    commit URL; the commit sha at its end pins the revision for loading. ``revision`` is the
    branch to push to (created if missing), ``private`` applies when a repo is created.
    """
    folder = Path(artifact_dir)
    kind = _detect(folder)
    no_links = {"data_repo": None, "gradient_store_repo": None}
    if kind == "model":
        return {
            "model": _publish_model(
                folder, repo_id, revision, private, commit_message, no_links, None
            )
        }
    if kind == "gradients":
        return {"gradients": _publish_gradients(folder, repo_id, revision, private, commit_message)}
    if kind == "data":
        return {"data": _publish_data(folder, repo_id, revision, private, commit_message)}
    urls: dict[str, str] = {}
    links: dict[str, str | None] = dict(no_links)
    if _detect_optional(folder / "data") == "data":
        links["data_repo"] = f"{repo_id}-data"
        urls["data"] = _publish_data(
            folder / "data", links["data_repo"], revision, private, commit_message
        )
    if _detect_optional(folder / "gradients") == "gradients":
        links["gradient_store_repo"] = f"{repo_id}-gradients"
        urls["gradients"] = _publish_gradients(
            folder / "gradients", links["gradient_store_repo"], revision, private, commit_message
        )
    urls["model"] = _publish_model(
        folder / "meta_init",
        repo_id,
        revision,
        private,
        commit_message,
        links,
        _run_metrics(folder),
    )
    return urls


def _detect_optional(folder: Path) -> str | None:
    """:func:`_detect` for a run's optional sub-folders: ``None`` when absent."""
    return _detect(folder) if folder.is_dir() else None
