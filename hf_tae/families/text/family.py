"""The instruction family: instruction templates (or datasets, categories, BIG-bench tasks) as
tasks, a seq2seq LM with LoRA adapters, token log-odds as the score (the Grad-TAE text setting:
T5 + LoRA, instructions of one dataset as tasks).

Data come from the embedded digit skills (default, with planted groups), a ``datasets`` source
with a template file (``--dataset_name`` + ``--templates``; or ``--category_column`` with one
template), BIG-bench JSON task files (``--bigbench``) or a saved :class:`TextTasks`
(``--text_tasks``). Rows are tokenized by a BPE tokenizer trained on the data or by
``--tokenizer_name_or_path`` / ``--model_name_or_path``'s tokenizer. The model is any
``AutoModelForSeq2SeqLM`` (``--model_name_or_path``) or a tiny T5 built from config, with peft
LoRA adapters: only the adapters are trained, and gradients are taken on them.
Metrics: exact match (selection), token accuracy (the ``f1`` column) and the teacher-forced
loss (the affinity's default) per task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hf_tae.errors import TaeError
from hf_tae.families import register_family
from hf_tae.families.base import TaskFamily, TaskMetrics
from hf_tae.utils.io import artifact_folder

if TYPE_CHECKING:
    from hf_tae.families.text.data import TextTasks
    from hf_tae.tasks.taskset import TaskSet

SCORE_TOKENS = ("mean", "first")
ADAPTERS = ("lora", "ia3")


def default_cache_dir() -> str:
    """Where tiny base models built from config are kept: ``$HF_TAE_CACHE/base_models``, else
    ``$HF_HOME/hf_tae/base_models`` (``HF_HOME`` defaults to ``~/.cache/huggingface``)."""
    home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    return os.path.join(os.environ.get("HF_TAE_CACHE", os.path.join(home, "hf_tae")), "base_models")


def cached_base_model(model_class: Callable, config, seed: int, cache_dir: str | None,
                      prefix: str) -> str:  # fmt: skip
    """Folder of a tiny base model built by ``model_class(config)`` (a model class or a function
    that builds one) with weights drawn from ``seed``, under ``cache_dir`` (default
    :func:`default_cache_dir`), keyed by a hash of both; built and saved on first use. Saved
    rather than kept in memory so that the adapters of a saved meta-initialization name a base
    model they can be loaded onto."""
    import torch

    key = json.dumps([config.to_dict(), seed], sort_keys=True, default=str)
    folder = (
        Path(cache_dir or default_cache_dir())
        / f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    )
    if not (folder / "config.json").is_file():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = model_class(config)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        if folder.exists():  # another process built it meanwhile
            shutil.rmtree(tmp)
        else:
            tmp.replace(folder)
    return str(folder)


def attach_adapter(base, args: InstructionArguments, task_type: str):
    """``base`` with trainable adapters, everything else frozen: LoRA from TRL's
    ``ModelConfig`` (``trl.get_peft_config``, as ``trl sft --use_peft`` builds it) or (IA)³ on
    peft's default modules for the architecture. A config that matches no module raises a
    :class:`TaeError` listing the model's linear modules."""
    import peft
    from trl import ModelConfig, get_peft_config

    # GPT-2's Conv1D stores weights as [in, out]: adapters on it need fan_in_fan_out
    conv1d = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if type(m).__name__ == "Conv1D"}
    if args.adapter == "ia3":
        config = peft.IA3Config(task_type=task_type, fan_in_fan_out=bool(conv1d))
    else:
        model_config = ModelConfig(use_peft=True, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                   lora_dropout=args.lora_dropout, lora_task_type=task_type,
                                   lora_target_modules=list(args.lora_target_modules))  # fmt: skip
        config = get_peft_config(model_config)
        config.fan_in_fan_out = bool(conv1d & set(config.target_modules))
    try:
        return peft.get_peft_model(base, config)
    except ValueError as err:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                         if type(m).__name__ in ("Linear", "Conv1D")})  # fmt: skip
        what = (f"--lora_target_modules {args.lora_target_modules}" if args.adapter == "lora"
                else "peft's default (IA)3 modules")  # fmt: skip
        raise TaeError(
            f"{what} match no module of {type(base).__name__} ({err}); its linear modules are "
            f"named {linear}."
        ) from err


@dataclass
class InstructionArguments:
    """Where the text tasks come from (first match wins: text_tasks, bigbench, dataset_name,
    embedded digit skills), the tokenizer, the seq2seq model and its LoRA adapters."""

    text_tasks: str | None = field(
        default=None,
        metadata={"help": "Saved text tasks: a folder or Hub dataset repo id (a run's data/, "
                          "pushed by hf-tae publish; its tokenizer is used when it has one)."},
    )
    bigbench: str | None = field(
        default=None,
        metadata={"help": "BIG-bench JSON tasks: a folder of task.json files, one task.json, or "
                          "the bigbench sdist tarball (pip download --no-deps bigbench==1.0.0)."},
    )  # fmt: skip
    bigbench_tasks: list[str] | None = field(
        default=None, metadata={"help": "BIG-bench: task names to use (default: all JSON tasks)."}
    )
    bigbench_keywords: list[str] | None = field(
        default=None, metadata={"help": "BIG-bench: keep tasks with any of these keywords."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A datasets source: Hub name (e.g. super_glue), data file or folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Its config (e.g. rte)."})
    templates: str | None = field(
        default=None,
        metadata={"help": "YAML/JSON file of instruction templates; each template is a task."},
    )
    category_column: str | None = field(
        default=None,
        metadata={"help": "With --dataset_name: one task per value of this column, rendered by "
                          "the single template of --templates."},
    )  # fmt: skip
    max_rows_per_task: int | None = field(
        default=None, metadata={"help": "At most this many training rows per task."}
    )
    skills: list[str] | None = field(
        default=None,
        metadata={"help": "Embedded default: the digit skills, each a planted group (default: "
                          "max min zero even; big and five make the harder variant; "
                          "zero_legacy is zero's wording before session 13)."},
    )
    train_per_template: int = field(
        default=60, metadata={"help": "Embedded default: training rows per template."}
    )
    eval_per_template: int = field(
        default=40, metadata={"help": "Embedded default: validation and test rows per template."}
    )
    data_seed_text: int = field(default=0, metadata={"help": "Seed of the data and its splits."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use (default: --model_name_or_path's, else a BPE "
                          "tokenizer trained on the training texts)."},
    )  # fmt: skip
    vocab_size: int = field(
        default=400, metadata={"help": "Size of the in-process BPE vocabulary."}
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Pad token for a tokenizer that has none (e.g. GPT-2's <|endoftext|>)."},
    )
    max_source_length: int = field(default=128, metadata={"help": "Longest input in tokens."})
    max_target_length: int = field(
        default=32, metadata={"help": "Longest target in tokens, with </s> (longer: truncated)."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub repo id or folder of an AutoModelForSeq2SeqLM (else a tiny T5 from config)."
        },
    )
    d_model: int = field(default=128, metadata={"help": "Tiny T5: hidden size."})
    d_ff: int = field(default=256, metadata={"help": "Tiny T5: feed-forward size."})
    num_layers: int = field(default=2, metadata={"help": "Tiny T5: encoder and decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Tiny T5: attention heads."})
    base_model_seed: int = field(
        default=0,
        metadata={"help": "Tiny T5: seed of the frozen base weights (the same base for every run, "
                          "as a pretrained checkpoint would be)."},
    )  # fmt: skip
    base_model_dir: str | None = field(
        default=None,
        metadata={"help": "Tiny T5: folder that keeps the built base models (default: "
                          "$HF_TAE_CACHE/base_models, else $HF_HOME/hf_tae/base_models)."},
    )  # fmt: skip
    adapter: str = field(
        default="lora",
        metadata={"help": "Adapter on the frozen base: 'lora' (LoRA, from TRL's ModelConfig) or "
                          "'ia3' ((IA)3 on peft's default modules of the architecture).",
                  "choices": list(ADAPTERS)},
    )  # fmt: skip
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q", "k", "v", "o", "wi", "wo"],
        metadata={"help": "Module names that get LoRA adapters (T5: q k v o wi wo)."},
    )
    score_tokens: str = field(
        default="mean",
        metadata={"help": "Score whose gradients are projected: gold-token log-odds averaged over "
                          "the target ('mean', GradEx) or of its first token ('first', Grad-TAE).",
                  "choices": list(SCORE_TOKENS)},
    )  # fmt: skip


@register_family
class InstructionFamily(TaskFamily):
    """Instruction templates as tasks with a LoRA-tuned seq2seq LM (the Grad-TAE text setting)."""

    name = "instructions"
    description = (
        "instruction templates as tasks, seq2seq LM + LoRA (default: planted digit skills)"
    )
    arguments_class = InstructionArguments
    capacity_options = ("--lora_r", "--d_model")
    # every run takes the same number of steps, so that "more steps" never poses as transfer
    training_defaults = {
        "learning_rate": 3e-3,
        "max_steps": 300,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 256,
        "weight_decay": 0.0,
        "eval_strategy": "steps",
        "eval_steps": 100,
        "save_strategy": "best",
        "logging_strategy": "steps",
        "logging_steps": 100,
        "metric_for_best_model": "avg_accuracy",
    }
    # one model per template for the comparison doubles the run time: --compare_single_tasks true
    pipeline_defaults = {"subset_size": 3, "num_meta_inits": 2, "compare_single_tasks": False}
    metrics = TaskMetrics(
        selection="accuracy",
        affinity="log_loss",
        estimated=("accuracy", "log_loss"),
        labels={"f1": "token accuracy", "accuracy": "exact match", "log_loss": "target loss"},
    )
    pipeline_tag = "text2text-generation"

    @property
    def trainer_class(self):
        from hf_tae.trainers.seq2seq import Seq2SeqMultitaskTrainer

        return Seq2SeqMultitaskTrainer

    def load_text_tasks(self, args: InstructionArguments) -> TextTasks:
        """The :class:`TextTasks` the arguments name."""
        from hf_tae.families.text import data
        from hf_tae.families.text.bigbench import bigbench_tasks
        from hf_tae.families.text.embedded import make_digit_skills
        from hf_tae.families.text.templates import load_templates

        if args.text_tasks:
            return data.TextTasks.load(args.text_tasks)
        if args.bigbench:
            return bigbench_tasks(args.bigbench, args.bigbench_tasks, args.bigbench_keywords,
                                  args.max_rows_per_task, args.data_seed_text)  # fmt: skip
        if args.dataset_name:
            if not args.templates:
                raise TaeError("--dataset_name needs --templates (a YAML/JSON file of templates).")
            splits = data.load_rows(args.dataset_name, args.dataset_config)
            templates = load_templates(args.templates)
            if args.category_column:
                if len(templates) != 1:
                    raise TaeError(
                        f"--category_column takes one template; {args.templates} has {len(templates)}."
                    )
                return data.tasks_from_column(splits, args.category_column, templates[0],
                                              args.max_rows_per_task, args.data_seed_text)  # fmt: skip
            return data.tasks_from_templates(splits, templates, args.max_rows_per_task,
                                             seed=args.data_seed_text,
                                             description=f"templates of {args.dataset_name}")  # fmt: skip
        return make_digit_skills(args.skills, args.train_per_template, args.eval_per_template,
                                 seed=args.data_seed_text)  # fmt: skip

    def load_tasks(self, args: InstructionArguments) -> TaskSet:
        from hf_tae.families.text.tokenization import TOKENIZER_FOLDER, tokenizer_for

        if args.score_tokens not in SCORE_TOKENS:
            raise TaeError(
                f"--score_tokens {args.score_tokens!r} is not one of {list(SCORE_TOKENS)}."
            )
        if args.adapter not in ADAPTERS:
            raise TaeError(f"--adapter {args.adapter!r} is not one of {list(ADAPTERS)}.")
        if args.text_tasks:  # a repo id is downloaded once; rows and tokenizer read the copy
            args = dataclasses.replace(args, text_tasks=str(artifact_folder(args.text_tasks)))
        text_tasks = self.load_text_tasks(args)
        name = args.tokenizer_name_or_path or args.model_name_or_path
        saved = Path(args.text_tasks or "") / TOKENIZER_FOLDER  # a run's data/ keeps its tokenizer
        if name is None and args.text_tasks and saved.is_dir():
            name = str(saved)
        tokenizer = tokenizer_for(text_tasks, name, args.vocab_size)
        if args.pad_token is not None:
            tokenizer.pad_token = args.pad_token
        return self.tokenize(text_tasks, tokenizer, args.max_source_length, args.max_target_length)

    def widen(self, args: InstructionArguments) -> InstructionArguments | None:
        """The tiny base built from config twice as wide (``--d_model``, ``--d_ff``; the LoRA
        rank stays); None for a pretrained ``--model_name_or_path``."""
        if args.model_name_or_path:
            return None
        return replace(args, d_model=2 * args.d_model, d_ff=2 * args.d_ff)

    def model_init(self, args: InstructionArguments, tasks: TaskSet):
        from transformers import AutoModelForSeq2SeqLM

        base = AutoModelForSeq2SeqLM.from_pretrained(
            args.model_name_or_path or self.tiny_base(args, tasks)
        )
        return attach_adapter(base, args, "SEQ_2_SEQ_LM")

    def tiny_base(self, args: InstructionArguments, tasks: TaskSet) -> str:
        """Folder of the tiny T5 base built from config with ``--base_model_seed`` (built and
        saved on first use, :func:`cached_base_model`)."""
        from transformers import T5Config, T5ForConditionalGeneration

        tokenizer = tasks.source.tokenizer
        config = T5Config(vocab_size=len(tokenizer), d_model=args.d_model, d_kv=args.d_model // args.num_heads,
                          d_ff=args.d_ff, num_layers=args.num_layers, num_decoder_layers=args.num_layers,
                          num_heads=args.num_heads, dropout_rate=0.0,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          decoder_start_token_id=tokenizer.pad_token_id)  # fmt: skip
        return cached_base_model(T5ForConditionalGeneration, config, args.base_model_seed,
                                 args.base_model_dir, "tiny-t5")  # fmt: skip

    @staticmethod
    def tokenize(text_tasks: TextTasks, tokenizer, max_source_length: int,
                 max_target_length: int) -> TaskSet:  # fmt: skip
        """The task set of the text rows for this family's model (seq2seq: source and target)."""
        from hf_tae.families.text.tokenization import tokenize_text_tasks

        return tokenize_text_tasks(text_tasks, tokenizer, max_source_length, max_target_length)

    def score_function(self, args: InstructionArguments):
        from hf_tae.models.scores import TokenLogOddsScore

        return TokenLogOddsScore(shift=False, first_token=args.score_tokens == "first")

    def collate_fn(self, args: InstructionArguments):
        from hf_tae.trainers.seq2seq import Seq2SeqCollator

        return Seq2SeqCollator()

    def describe(self, tasks: TaskSet) -> str:
        return repr(tasks.source)


# the causal variant subclasses InstructionFamily; importing it here registers it with this module
from hf_tae.families.text import causal  # noqa: E402, F401
