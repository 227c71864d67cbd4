"""The instruction (text) family: templates, datasets, categories or BIG-bench JSON tasks as
tasks, tokenized for a seq2seq LM with LoRA adapters (:mod:`hf_tae.families.text.family`)."""

from hf_tae.families.text.bigbench import BigBenchTask, bigbench_tasks, read_bigbench
from hf_tae.families.text.data import (
    TextTasks,
    load_rows,
    tasks_from_column,
    tasks_from_datasets,
    tasks_from_templates,
)
from hf_tae.families.text.embedded import make_digit_skills
from hf_tae.families.text.templates import Template, load_templates
from hf_tae.families.text.tokenization import (
    TokenizedTextTasks,
    tokenize_text_tasks,
    train_bpe_tokenizer,
)

__all__ = [
    "BigBenchTask",
    "TextTasks",
    "Template",
    "TokenizedTextTasks",
    "bigbench_tasks",
    "load_rows",
    "load_templates",
    "make_digit_skills",
    "read_bigbench",
    "tasks_from_column",
    "tasks_from_datasets",
    "tasks_from_templates",
    "tokenize_text_tasks",
    "train_bpe_tokenizer",
]
