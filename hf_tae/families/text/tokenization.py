"""Tokenizers built in-process and the tokenized task set of text tasks.

Tokenizer choice matters more than model size for a tiny model: a byte-pair vocabulary of a few
hundred symbols trained on the task texts (digits split one per token) learns far faster than
bytes. :func:`train_bpe_tokenizer` builds one with the ``tokenizers`` library (no download) and
wraps it in ``PreTrainedTokenizerFast``; any Hub tokenizer works too.

:func:`tokenize_text_tasks` turns :class:`~hf_tae.families.text.data.TextTasks` into a
:class:`~hf_tae.TaskSet` whose rows carry ``input_ids``, ``attention_mask`` and ``labels``
(target ids ending in the end-of-sequence token, so that teacher-forced argmax equals greedy
decoding), plus ``target_class`` (an id of the target string: the label-frequency baseline's
"class", i.e. predicting a task's most frequent answer).
:func:`tokenize_prompt_completion` does the same for a causal LM: one sequence of prompt and
completion tokens per row, the labels masked (-100) on the prompt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from hf_tae.errors import TaeError
from hf_tae.utils.io import artifact_folder, atomic_folder, push_folder_to_hub

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hf_tae.families.text.data import TextTasks
    from hf_tae.tasks.taskset import TaskSet

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
#: Where :meth:`TokenizedTextTasks.save` puts the tokenizer, beside the text tasks' files.
TOKENIZER_FOLDER = "tokenizer"
INPUT_COLUMNS = ["input_ids", "attention_mask", "labels"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A byte-pair tokenizer trained on ``texts``: whitespace and single digits pre-split,
    ``<pad>`` (id 0), ``</s>`` (id 1), ``<unk>`` (id 2), no post-processor (callers add
    ``</s>`` where they need it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tokenizer_for(text_tasks: TextTasks, name_or_path: str | None, vocab_size: int):
    """``AutoTokenizer`` of ``name_or_path``, else a BPE tokenizer trained on the tasks'
    training texts."""
    if name_or_path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path)
    train = text_tasks.dataset.filter(lambda split: split == "train", input_columns="split")
    return train_bpe_tokenizer(list(train["input"]) + list(train["target"]), vocab_size)


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, what: str,
         end_with_eos: bool, add_special_tokens: bool = True) -> list[list[int]]:  # fmt: skip
    eos = tokenizer.eos_token_id
    out, truncated = [], 0
    for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]:
        if end_with_eos and eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        if len(ids) > max_length:
            truncated += 1
            ids = ids[: max_length - 1] + [ids[-1]] if end_with_eos else ids[:max_length]
        out.append(ids)
    if truncated:
        logger.warning("%d of %d %ss are longer than max_%s_length=%d tokens and were truncated; "
                       "raise --max_%s_length to keep them whole.", truncated, len(texts), what,
                       what, max_length, what)  # fmt: skip
    return out


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, max_source_length: int,
                     max_target_length: int) -> None:  # fmt: skip
    if tokenizer.pad_token_id is None:
        raise TaeError(
            f"the tokenizer {type(tokenizer).__name__} has no pad token; set one first, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token (--pad_token for the causal family)."
        )
    if max_target_length < 2 or max_source_length < 1:
        raise TaeError(
            "max_target_length must be >= 2 (a token and </s>) and max_source_length >= 1."
        )


def _task_set(text_tasks: TextTasks, tokenizer: PreTrainedTokenizerBase,
              input_ids: list[list[int]], labels: list[list[int]]) -> TaskSet:  # fmt: skip
    """The task set of tokenized rows: ``input_ids``, ``attention_mask``, ``labels`` and
    ``target_class`` added to the text rows."""
    from datasets import List, Value

    from hf_tae.tasks.taskset import TaskSet

    data = text_tasks.dataset
    answers = sorted(set(data["target"]))
    index = {answer: i for i, answer in enumerate(answers)}
    dataset = (
        data.add_column("input_ids", input_ids, feature=List(Value("int32")))
        .add_column(
            "attention_mask", [[1] * len(s) for s in input_ids], feature=List(Value("int8"))
        )
        .add_column("labels", labels, feature=List(Value("int32")))
        .add_column("target_class", [index[t] for t in data["target"]], feature=Value("int32"))
    )
    source = TokenizedTextTasks(text_tasks, tokenizer)
    return TaskSet(dataset, text_tasks.task_names, input_columns=INPUT_COLUMNS,
                   label_column="target_class", source=source)  # fmt: skip


def tokenize_text_tasks(
    text_tasks: TextTasks,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int = 128,
    max_target_length: int = 32,
) -> TaskSet:
    """The :class:`~hf_tae.TaskSet` of ``text_tasks`` for a seq2seq LM (single-label layout;
    the source is a :class:`TokenizedTextTasks`). Over-long inputs and targets are truncated
    with a warning that counts them (targets keep their final end-of-sequence token)."""
    _check_tokenizer(tokenizer, max_source_length, max_target_length)
    data = text_tasks.dataset
    sources = _ids(tokenizer, list(data["input"]), max_source_length, "source", end_with_eos=False)
    targets = _ids(tokenizer, list(data["target"]), max_target_length, "target", end_with_eos=True)
    return _task_set(text_tasks, tokenizer, sources, targets)


def tokenize_prompt_completion(
    text_tasks: TextTasks,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int = 128,
    max_target_length: int = 32,
) -> TaskSet:
    """The :class:`~hf_tae.TaskSet` of ``text_tasks`` for a causal LM: one sequence per row,
    the prompt's tokens then the completion's and the end-of-sequence token, with ``labels``
    -100 on the prompt (the loss, metrics and scores see the completion only).

    Prompt and completion are tokenized apart and joined as ids, so the completion starts on a
    token boundary (TRL's text path tokenizes ``prompt + completion`` and warns when merges
    cross the boundary); only the prompt gets the tokenizer's special tokens (a BOS).
    Truncation is counted and warned about as in :func:`tokenize_text_tasks`.
    """
    _check_tokenizer(tokenizer, max_source_length, max_target_length)
    if tokenizer.eos_token_id is None:
        raise TaeError(
            f"the tokenizer {type(tokenizer).__name__} has no end-of-sequence token; a causal LM "
            "needs one to end its completions (set tokenizer.eos_token)."
        )
    data = text_tasks.dataset
    prompts = _ids(tokenizer, list(data["input"]), max_source_length, "source", end_with_eos=False)
    completions = _ids(tokenizer, list(data["target"]), max_target_length, "target",
                       end_with_eos=True, add_special_tokens=False)  # fmt: skip
    input_ids = [p + c for p, c in zip(prompts, completions, strict=True)]
    labels = [[-100] * len(p) + c for p, c in zip(prompts, completions, strict=True)]
    return _task_set(text_tasks, tokenizer, input_ids, labels)


class TokenizedTextTasks:
    """The source of a text task set: the :class:`TextTasks` and the tokenizer that encoded
    them (saved together; its pad id pads the batches)."""

    def __init__(self, text_tasks: TextTasks, tokenizer: PreTrainedTokenizerBase):
        self.text_tasks, self.tokenizer = text_tasks, tokenizer

    @property
    def task_names(self) -> list[str]:
        return self.text_tasks.task_names

    @property
    def task_groups(self) -> list[int] | None:
        return self.text_tasks.task_groups

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """The text tasks (:meth:`TextTasks.save`) and the tokenizer (``tokenizer/``), together
        and atomically: a run's ``data/``, which ``--text_tasks`` reads back."""
        with atomic_folder(path, overwrite) as tmp:
            self.text_tasks.write(tmp)
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_FOLDER))
        return Path(path)

    @classmethod
    def load(cls, path_or_repo_id: str | os.PathLike,
             revision: str | None = None) -> TokenizedTextTasks:  # fmt: skip
        """A folder written by :meth:`save` (or a Hub dataset repo pushed by
        :meth:`push_to_hub`): the text tasks with the tokenizer that encoded them."""
        from transformers import AutoTokenizer

        from hf_tae.families.text.data import TextTasks

        path = artifact_folder(path_or_repo_id, revision)
        if not (path / TOKENIZER_FOLDER).is_dir():
            raise TaeError(
                f"{path_or_repo_id} has no {TOKENIZER_FOLDER}/; load it with TextTasks.load, or "
                "save the tasks with their tokenizer (TokenizedTextTasks.save, a run's data/)."
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_FOLDER))
        return cls(TextTasks.load(path), tokenizer)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload text tasks and their tokenizer with hf_tae",
    ) -> str:
        """Push the folder of :meth:`save` (rows, groups and tokenizer) to a Hub dataset repo;
        returns the commit URL."""
        return push_folder_to_hub(self.save, repo_id, private=private, revision=revision,
                                  commit_message=commit_message)  # fmt: skip

    def fingerprint(self) -> str:
        """sha256 of the rows and the tokenizer's vocabulary."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        return hashlib.sha256((self.text_tasks.fingerprint() + repr(vocab)).encode()).hexdigest()

    def __repr__(self) -> str:
        return (
            f"{self.text_tasks!r}, {type(self.tokenizer).__name__} ({len(self.tokenizer)} tokens)"
        )
