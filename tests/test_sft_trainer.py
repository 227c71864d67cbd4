"""SFTMultitaskTrainer (TRL's SFTTrainer on a task set): the loss covers the completion only,
per-task metrics match counts made by hand from the model's logits, the causal token log-odds
score and its captured gradients match autograd, and bad inputs fail with the fix named.

Every reference is computed here from the model's plain forward (``model(...).logits``), never
from the trainer's fused head or metric code."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hf_tae.errors import TaeError

PROMPTS = ["max: 3 1 2", "min: 9 4 7 5", "max: 8 8 1", "min: 2 6 3"]
COMPLETIONS = ["3", "4", "8", "2"]
TASKS = [0, 1, 0, 1]


@pytest.fixture(scope="module")
def tokenizer():
    from hf_tae.families.text.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(PROMPTS + COMPLETIONS + ["smallest largest digit"], vocab_size=60)


def _gpt2(tokenizer, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return GPT2LMHeadModel(config)


def _lora(model, seed=1):
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(model, config)


def _text_task_set():
    """Prompt/completion text rows (TRL tokenizes them); every row in every split."""
    from datasets import ClassLabel, Dataset, Features, Value

    from hf_tae.tasks.taskset import TaskSet

    features = Features({"task": ClassLabel(names=["max", "min"]), "split": Value("string"),
                         "prompt": Value("string"), "completion": Value("string")})  # fmt: skip
    rows = {"task": [], "split": [], "prompt": [], "completion": []}
    for split in ("train", "validation", "test"):
        rows["task"] += TASKS
        rows["split"] += [split] * len(TASKS)
        rows["prompt"] += PROMPTS
        rows["completion"] += COMPLETIONS
    dataset = Dataset.from_dict(rows, features=features)
    return TaskSet(dataset, input_columns=["prompt"], label_column="completion")


def _tokenized_task_set(tokenizer, max_target_length=32):
    from hf_tae.families.text.data import TextTasks
    from hf_tae.families.text.tokenization import tokenize_prompt_completion

    records = [
        {"task": ["max", "min"][t], "split": split, "input": p, "target": c}
        for split in ("train", "validation", "test")
        for p, c, t in zip(PROMPTS, COMPLETIONS, TASKS, strict=True)
    ]
    text = TextTasks.from_records(records, ["max", "min"])
    return tokenize_prompt_completion(text, tokenizer, max_target_length=max_target_length)


def _args(tmp_path, **kwargs):
    from hf_tae.trainers import MultitaskTrainingArguments

    defaults = {"output_dir": str(tmp_path), "report_to": "none", "disable_tqdm": True,
                "per_device_train_batch_size": 4, "per_device_eval_batch_size": 3,
                "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False,
                "use_cpu": True, "dataloader_pin_memory": False}  # fmt: skip
    return MultitaskTrainingArguments(**{**defaults, **kwargs})


def _hand_rows(model, tokenizer):
    """Per row, from one unpadded forward: the completion tokens' gold log-probabilities and
    whether each is the argmax. The completion is what follows the prompt's own tokens, plus
    the end-of-sequence token."""
    out = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        rows = range(len(p) - 1, len(p) + len(c) - 1)  # logits at t predict token t + 1
        log_probs = torch.log_softmax(logits, -1)
        gold = [float(log_probs[t, tok]) for t, tok in zip(rows, c, strict=True)]
        top = [int(logits[t].argmax()) == tok for t, tok in zip(rows, c, strict=True)]
        out.append((np.array(gold), np.array(top)))
    return out


# ------------------------------------------------------------------------ the loss masks the prompt
@pytest.mark.parametrize("data", ["text", "tokenized"])
def test_training_loss_is_the_completion_only_cross_entropy(tokenizer, tmp_path, data):
    from hf_tae.trainers.sft import SFTMultitaskTrainer

    model = _lora(_gpt2(tokenizer)).eval()
    task_set = _text_task_set() if data == "text" else _tokenized_task_set(tokenizer)
    trainer = SFTMultitaskTrainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=4),
                                  task_set=task_set, processing_class=tokenizer)  # fmt: skip
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    assert sorted(batch["task"].tolist()) == sorted(TASKS)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    hand = _hand_rows(model, tokenizer)
    all_gold = np.concatenate([g for g, _ in hand])
    assert float(loss) == pytest.approx(-all_gold.mean(), rel=1e-5)
    # and the prompt really is out of it: the full-sequence loss differs
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)).loss  # fmt: skip
    assert abs(float(full) - float(loss)) > 1e-3


def test_per_task_metrics_match_hand_counts(tokenizer, tmp_path):
    from hf_tae.trainers.sft import SFTMultitaskTrainer

    model = _lora(_gpt2(tokenizer, seed=3), seed=4).eval()
    trainer = SFTMultitaskTrainer(model=model, args=_args(tmp_path),
                                  task_set=_tokenized_task_set(tokenizer))  # fmt: skip
    metrics = trainer.evaluate_tasks("validation")
    hand = _hand_rows(model, tokenizer)
    for t, name in enumerate(["max", "min"]):
        rows = [hand[i] for i, task in enumerate(TASKS) if task == t]
        exact = np.mean([top.all() for _, top in rows])
        token_acc = np.mean([top.mean() for _, top in rows])
        loss = np.mean([-gold.mean() for gold, _ in rows])
        assert metrics[f"eval_{name}_accuracy"] == pytest.approx(exact)
        assert metrics[f"eval_{name}_f1"] == pytest.approx(token_acc)
        assert metrics[f"eval_{name}_log_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["eval_avg_log_loss"] == pytest.approx(
        np.mean([metrics["eval_max_log_loss"], metrics["eval_min_log_loss"]])
    )


def test_metrics_count_exact_matches_of_a_model_that_knows_some_answers(tokenizer, tmp_path):
    """A model trained to memorize the rows: exact match must follow its argmaxes, which the
    hand count reads from plain logits (non-trivial counts, not all 0)."""
    from hf_tae.trainers.sft import SFTMultitaskTrainer

    model = _lora(_gpt2(tokenizer, seed=5), seed=6)
    args = _args(tmp_path, max_steps=40, learning_rate=3e-2)
    trainer = SFTMultitaskTrainer(model=model, args=args, task_set=_tokenized_task_set(tokenizer))
    trainer.train()
    model.eval()
    metrics = trainer.evaluate_tasks("test")
    hand = _hand_rows(model, tokenizer)
    exact = [np.mean([hand[i][1].all() for i, t in enumerate(TASKS) if t == k]) for k in (0, 1)]
    assert sum(exact) > 0
    assert [metrics["test_max_accuracy"], metrics["test_min_accuracy"]] == pytest.approx(exact)


# ----------------------------------------------------------------- score and gradients vs autograd
@pytest.mark.parametrize("first_token", [False, True])
def test_causal_score_and_captured_gradients_match_autograd(tokenizer, first_token):
    from capture_helpers import naive_grads, run_capture

    from hf_tae.models.scores import TokenLogOddsScore
    from hf_tae.trainers.sft import CompletionCollator

    model = _lora(_gpt2(tokenizer)).double().eval()
    task_set = _tokenized_task_set(tokenizer)
    batch = CompletionCollator()(task_set, np.arange(len(PROMPTS)))
    score_fn = TokenLogOddsScore(shift=True, first_token=first_token)

    def score(model, batch):
        return score_fn(model(**batch), batch)

    # the score by hand: log p/(1-p) of each completion token (and </s>), mean or first
    expected = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
        q = [float(torch.log(probs[len(p) - 1 + j, tok] / (1 - probs[len(p) - 1 + j, tok])))
             for j, tok in enumerate(c)]  # fmt: skip
        expected.append(q[0] if first_token else np.mean(q))
    with torch.no_grad():
        assert score(model, batch).numpy() == pytest.approx(expected, rel=1e-9)

    capture, z = run_capture(model, batch, score, dim=32)
    names = [name for name, _ in capture.parameters]
    assert names and all("lora_" in n for n in names)
    grads = naive_grads(model, batch, score, names)
    reference = sum(grads[n].flatten(1) @ capture.projector.matrix_block(n) for n in names)
    scale = reference.abs().max()
    assert scale > 0 and float((z - reference).abs().max() / scale) < 1e-9


# ---------------------------------------------------------------------------------- arguments
def test_pipeline_arguments_become_a_cpu_safe_sft_config(tmp_path):
    from trl import SFTConfig

    from hf_tae.trainers.sft import SFTMultitaskConfig, as_sft_config

    args = _args(tmp_path, tasks=["max"], learning_rate=0.02, max_steps=7,
                 task_balanced_sampling=True)  # fmt: skip
    config = as_sft_config(args)
    assert isinstance(config, SFTConfig) and isinstance(config, SFTMultitaskConfig)
    assert (config.tasks, config.learning_rate, config.max_steps) == (["max"], 0.02, 7)
    assert config.task_balanced_sampling and config.output_dir == str(tmp_path)
    assert (config.bf16, config.gradient_checkpointing, config.packing) == (False, False, False)
    assert as_sft_config(config) is config
    plain = SFTMultitaskConfig(output_dir=str(tmp_path))
    assert (plain.bf16, plain.gradient_checkpointing, plain.metric_for_best_model) == (
        False, False, "avg_accuracy")  # fmt: skip


def test_task_selection_reports_the_selected_tasks_only(tokenizer, tmp_path):
    from hf_tae.trainers.sft import SFTMultitaskTrainer

    trainer = SFTMultitaskTrainer(model=_lora(_gpt2(tokenizer)), args=_args(tmp_path, tasks=["min"]),
                                  task_set=_tokenized_task_set(tokenizer))  # fmt: skip
    assert len(trainer.train_dataset) == TASKS.count(1)
    metrics = trainer.evaluate_tasks("test")
    assert "test_min_accuracy" in metrics and "test_max_accuracy" not in metrics


# ---------------------------------------------------------------------------------- bad input
def test_a_tokenizer_without_pad_token_is_refused_with_the_fix(tokenizer, tmp_path):
    import copy

    from hf_tae.families.text.data import TextTasks
    from hf_tae.families.text.tokenization import tokenize_prompt_completion
    from hf_tae.trainers.sft import SFTMultitaskTrainer

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    text = TextTasks.from_records(
        [{"task": "max", "split": s, "input": "max: 1 2", "target": "2"}
         for s in ("train", "validation", "test")], ["max"])  # fmt: skip
    with pytest.raises(TaeError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        tokenize_prompt_completion(text, no_pad)
    with pytest.raises(TaeError, match=r"no pad token.*tokenizer.pad_token"):
        SFTMultitaskTrainer(model=_gpt2(tokenizer), args=_args(tmp_path),
                            task_set=_text_task_set(), processing_class=no_pad)  # fmt: skip


def test_a_task_set_without_sequences_or_text_is_refused(tokenizer, tmp_path):
    from datasets import Dataset

    from hf_tae.tasks.taskset import TaskSet
    from hf_tae.trainers.sft import SFTMultitaskTrainer

    data = Dataset.from_dict({"task": [0], "split": ["train"], "x": [1.0], "labels": [0]})
    with pytest.raises(TaeError, match=r"input_ids and labels, or prompt and completion.*'x'"):
        SFTMultitaskTrainer(model=_gpt2(tokenizer), args=_args(tmp_path),
                            task_set=TaskSet(data, ["a"]), processing_class=tokenizer)  # fmt: skip


def test_long_completions_are_truncated_with_a_counted_warning(tokenizer, caplog):
    long = "9 9 9 9 9 9"  # six digit tokens
    from hf_tae.families.text.data import TextTasks
    from hf_tae.families.text.tokenization import tokenize_prompt_completion

    text = TextTasks.from_records(
        [{"task": "max", "split": s, "input": "max: 9 1", "target": t}
         for s in ("train", "validation", "test") for t in (long, "1")], ["max"])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        task_set = tokenize_prompt_completion(text, tokenizer, max_target_length=4)
    assert "3 of 6 targets are longer than max_target_length=4" in caplog.text
    assert "--max_target_length" in caplog.text
    eos = tokenizer.eos_token_id
    prompt = tokenizer("max: 9 1")["input_ids"]
    nine = tokenizer("9", add_special_tokens=False)["input_ids"]
    for row in task_set.dataset.to_list():
        completion = (nine * 3 if row["target"] == long else tokenizer("1")["input_ids"]) + [eos]
        assert row["input_ids"] == prompt + completion
        assert row["labels"] == [-100] * len(prompt) + completion
