"""The instruction family with a causal LM (``hf-tae run instructions_causal``): the same tasks
and data sources as ``instructions``, rows as prompt–completion sequences, trained by TRL's
``SFTTrainer`` (:class:`~hf_tae.trainers.sft.SFTMultitaskTrainer`, loss on the completion
only) with peft adapters on a tiny GPT-2 built from config or any ``AutoModelForCausalLM``
(``--model_name_or_path``).

Score (gradtae_methods.md B.2, GradEx's causal LMs): the gold-token log-odds
``log p/(1-p)`` of each completion token, averaged over the completion (``--score_tokens
mean``) or of its first token only (``first``, the Grad-TAE text setting, A.2); position t of
the sequence predicts token t + 1. Metrics are the seq2seq family's (exact match, token
accuracy, completion loss), under teacher forcing on the completion.

A separate family rather than a ``--model_type`` flag: the model, adapter targets, trainer,
score and defaults all change together, and ``hf-tae run --help`` lists it with its own
description and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hf_tae.families import register_family
from hf_tae.families.text.family import (
    InstructionArguments,
    InstructionFamily,
    attach_adapter,
    cached_base_model,
)

if TYPE_CHECKING:
    from hf_tae.families.text.data import TextTasks
    from hf_tae.tasks.taskset import TaskSet


#: Default end of every prompt. Without it a causal LM must answer from the prompt's last token,
#: which for "max: 3 9 1" is a digit like the ones before it; with it every template ends on the
#: same tokens, whose attention learns to read the answer (T5 answers from a decoder start
#: token). 300 LoRA steps on the default: test exact match 0.46 without it, 0.61 with it.
PROMPT_SUFFIX = "\nanswer:"

#: Weight scale of the tiny GPT-2's frozen random base. GPT-2's 0.02 leaves the tied output
#: embeddings so small that no adapter makes the next-token distribution confident (300 LoRA
#: steps: test completion loss 2.72, exact match 0.25); 0.2, nearer a pretrained checkpoint's
#: embedding norms, reaches 0.66 and 0.61 (both with position embeddings).
INITIALIZER_RANGE = 0.2


def _gpt2_without_positions(config):
    """A GPT-2 whose position embeddings are zero ("NoPE": causal attention alone still tells
    positions apart, Haviv et al. 2022). Frozen random position embeddings as large as the token
    embeddings drown which digit a token is; the default's skills read digits, not positions
    (300 LoRA steps on the default: test exact match 0.785 without them, 0.61 with them)."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    return model


@dataclass
class CausalInstructionArguments(InstructionArguments):
    """:class:`InstructionArguments` for a causal LM: the prompt is the input, the completion
    the target; the tiny model is a GPT-2 and LoRA targets its ``Conv1D`` layers."""

    max_source_length: int = field(default=128, metadata={"help": "Longest prompt in tokens."})
    max_target_length: int = field(
        default=32,
        metadata={"help": "Longest completion in tokens, with the end-of-sequence token "
                          "(longer: truncated, with a warning that counts them)."},
    )  # fmt: skip
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub repo id or folder of an AutoModelForCausalLM (else a tiny GPT-2 "
                          "from config)."},
    )  # fmt: skip
    d_model: int = field(default=128, metadata={"help": "Tiny GPT-2: hidden size (n_embd)."})
    d_ff: int = field(default=256, metadata={"help": "Tiny GPT-2: feed-forward size (n_inner)."})
    num_layers: int = field(default=2, metadata={"help": "Tiny GPT-2: layers (n_layer)."})
    num_heads: int = field(default=4, metadata={"help": "Tiny GPT-2: attention heads (n_head)."})
    base_model_seed: int = field(
        default=0,
        metadata={"help": "Tiny GPT-2: seed of the frozen base weights (the same base for every "
                          "run, as a pretrained checkpoint would be)."},
    )  # fmt: skip
    prompt_suffix: str = field(
        default=PROMPT_SUFFIX,
        metadata={"help": "Text appended to every prompt that does not end with it: where the "
                          "completion starts, like a chat template's assistant header ('' for "
                          "none)."},
    )  # fmt: skip
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["c_attn", "c_proj", "c_fc"],
        metadata={"help": "Module names that get LoRA adapters (GPT-2: c_attn c_proj c_fc; "
                          "Llama-style: q_proj k_proj v_proj o_proj)."},
    )  # fmt: skip


@register_family
class CausalInstructionFamily(InstructionFamily):
    """Instruction templates as tasks with a causal LM + LoRA trained by TRL's SFTTrainer."""

    name = "instructions_causal"
    description = (
        "instruction templates as tasks, causal LM + LoRA through TRL's SFTTrainer "
        "(default: planted digit skills, tiny GPT-2)"
    )
    arguments_class = CausalInstructionArguments
    # the setting the defaults above were measured at (300 steps: test exact match 0.785;
    # the seq2seq family's 3e-3 gives 0.769)
    training_defaults = {**InstructionFamily.training_defaults, "learning_rate": 1e-2}
    pipeline_tag = "text-generation"

    @property
    def trainer_class(self):
        from hf_tae.trainers.sft import SFTMultitaskTrainer

        return SFTMultitaskTrainer

    def load_text_tasks(self, args: CausalInstructionArguments) -> TextTasks:
        """The text tasks, ``--prompt_suffix`` appended to every input lacking it (a saved run's
        data already has it)."""
        tasks = super().load_text_tasks(args)
        suffix = args.prompt_suffix
        if not suffix:
            return tasks
        inputs = [x if x.endswith(suffix) else x + suffix for x in tasks.dataset["input"]]
        dataset = tasks.dataset.remove_columns("input").add_column("input", inputs)
        return type(tasks)(dataset, tasks.task_groups, tasks.description)

    @staticmethod
    def tokenize(text_tasks: TextTasks, tokenizer, max_source_length: int,
                 max_target_length: int) -> TaskSet:  # fmt: skip
        """Prompt–completion sequences, labels masked on the prompt."""
        from hf_tae.families.text.tokenization import tokenize_prompt_completion

        return tokenize_prompt_completion(text_tasks, tokenizer, max_source_length,
                                          max_target_length)  # fmt: skip

    def model_init(self, args: CausalInstructionArguments, tasks: TaskSet):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path or self.tiny_base(args, tasks)
        )
        return attach_adapter(base, args, "CAUSAL_LM")

    def tiny_base(self, args: CausalInstructionArguments, tasks: TaskSet) -> str:
        """Folder of the tiny GPT-2 built from config with ``--base_model_seed`` (saved on first
        use, :func:`~hf_tae.families.text.family.cached_base_model`), without absolute position
        embeddings (:func:`_gpt2_without_positions`); its context holds the longest prompt plus
        the longest completion."""
        from transformers import GPT2Config

        tokenizer = tasks.source.tokenizer
        ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=args.d_model, n_layer=args.num_layers,
                            n_head=args.num_heads, n_inner=args.d_ff,
                            n_positions=args.max_source_length + args.max_target_length,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            initializer_range=INITIALIZER_RANGE, **ids)  # fmt: skip
        return cached_base_model(_gpt2_without_positions, config, args.base_model_seed,
                                 args.base_model_dir, "tiny-gpt2-nopos")  # fmt: skip

    def score_function(self, args: CausalInstructionArguments):
        from hf_tae.models.scores import TokenLogOddsScore

        # B.2: mean over the completion's tokens; A.2: the first one. shift: logits at t score t + 1
        return TokenLogOddsScore(shift=True, first_token=args.score_tokens == "first")

    def collate_fn(self, args: CausalInstructionArguments):
        from hf_tae.trainers.sft import CompletionCollator

        return CompletionCollator()
