"""Generation metrics of the text trainers (``evaluate_tasks(split, generate=True)``): ROUGE-L
against values worked out by hand, per-task ROUGE-L and exact match of both trainers against
a loop here that generates one row at a time (no padding) with ``model.generate``, decodes with
the task set's tokenizer and scores with ``rouge_score`` itself, and the error when the
optional ``rouge-score`` package is missing."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from text_helpers import tiny_text_family

from hf_tae.errors import TaeError
from hf_tae.families import get_family
from hf_tae.trainers.metrics import GenerationTaskMetrics

torch.set_num_threads(1)
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

PROMPTS = ["sort: 3 1 2", "rev: 9 4 7 5", "sort: 8 6 1 4", "rev: 2 6"]
COMPLETIONS = ["1 2 3", "5 7 4 9", "1 4 6 8", "6 2"]
TASKS = ["sort", "rev", "sort", "rev"]


def _args(tmp_path, **kwargs):
    from hf_tae.trainers import MultitaskTrainingArguments

    defaults = {"output_dir": str(tmp_path), "report_to": "none", "disable_tqdm": True,
                "per_device_train_batch_size": 8, "per_device_eval_batch_size": 3,
                "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False,
                "use_cpu": True, "dataloader_pin_memory": False}  # fmt: skip
    return MultitaskTrainingArguments(**{**defaults, **kwargs})


def _reference(tasks, split, generate_one):
    """``{task: (mean ROUGE-L F, exact match)}`` from one unpadded row at a time: the
    generation (``generate_one(row, max_new_tokens)``, cut at ``</s>``) and the target (the
    ``labels`` tokens) decoded with the task set's tokenizer and scored by ``rouge_score``."""
    tokenizer = tasks.source.tokenizer
    eos = tokenizer.eos_token_id
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def text(ids):
        ids = list(ids)
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return tokenizer.decode(ids, skip_special_tokens=True)

    rows = {name: [tasks.dataset[int(r)] for r in tasks.rows(name, split)]
            for name in tasks.task_names}  # fmt: skip
    longest = max(sum(t != -100 for t in row["labels"]) for rs in rows.values() for row in rs)
    out = {}
    for name, task_rows in rows.items():
        rouge, exact = [], []
        for row in task_rows:
            with torch.no_grad():
                prediction = text(generate_one(row, longest))
            target = text([t for t in row["labels"] if t != -100])
            rouge.append(scorer.score(target, prediction)["rougeL"].fmeasure)
            exact.append(prediction.strip() == target.strip())
        out[name] = (np.mean(rouge), np.mean(exact))
    return out


def _assert_matches(metrics, reference, prefix):
    for name, (rouge, exact) in reference.items():
        assert metrics[f"{prefix}_{name}_rougeL"] == pytest.approx(rouge)
        assert metrics[f"{prefix}_{name}_generated_exact_match"] == pytest.approx(exact)
    assert metrics[f"{prefix}_avg_rougeL"] == pytest.approx(
        np.mean([r for r, _ in reference.values()])
    )


def test_rouge_l_against_hand_computed_lcs():
    # "the cat on mat" vs "the cat sat on the mat": LCS 4, P = 4/4, R = 4/6, F = 0.8
    # "d c b a" vs "a b c d": LCS 1, P = R = 1/4, F = 0.25
    # " 3 " vs "3": the same token (F = 1) and equal after stripping
    # "The Cat" vs "the cat": rouge_score lower-cases (F = 1); exact match does not
    predictions = ["the cat on mat", "d c b a", " 3 ", "The Cat"]
    targets = ["the cat sat on the mat", "a b c d", "3", "the cat"]
    metrics = GenerationTaskMetrics(["a", "b", "c"])
    out = metrics.per_task(predictions, targets, np.array([0, 1, 0, 1]))
    assert list(out) == ["a", "b"]
    assert out["a"]["rougeL"] == pytest.approx((0.8 + 1.0) / 2)
    assert out["b"]["rougeL"] == pytest.approx((0.25 + 1.0) / 2)
    assert out["a"]["generated_exact_match"] == 0.5 and out["b"]["generated_exact_match"] == 0.0
    assert out["a"]["support"] == 2
    flat = GenerationTaskMetrics(["a", "b", "c"], task_ids=[1])(predictions, targets, [0, 1, 0, 1])
    assert flat == pytest.approx({"b_rougeL": 0.625, "b_generated_exact_match": 0.0,
                                  "avg_rougeL": 0.625, "avg_generated_exact_match": 0.0})  # fmt: skip


def test_seq2seq_generation_metrics_match_a_one_row_loop(tmp_path):
    family, args, tasks = tiny_text_family("instructions", tmp_path / "base")
    torch.manual_seed(0)
    model = family.model_init(args, tasks)
    trainer = family.trainer_class(model=model, args=_args(tmp_path, max_steps=40, learning_rate=3e-2),
                                   task_set=tasks)  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate_tasks("test", generate=True)
    tokenizer = tasks.source.tokenizer

    def generate_one(row, max_new_tokens):
        out = model.generate(input_ids=torch.tensor([row["input_ids"]]),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        return out[0, 1:].tolist()  # without the decoder start token

    model.eval()
    reference = _reference(tasks, "test", generate_one)
    _assert_matches(metrics, reference, "test")
    assert 0 < metrics["test_avg_rougeL"] < 1  # the trained model gets some answers, not all
    # with targets ending in </s>, teacher-forced exact match is greedy decoding's
    for name in tasks.task_names:
        assert metrics[f"test_{name}_generated_exact_match"] == metrics[f"test_{name}_accuracy"]
    assert "eval_avg_rougeL" in trainer.evaluate_tasks("validation", generate=True)
    assert not any("rougeL" in key for key in trainer.evaluate_tasks("test"))


def _causal_setup():
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_tae.families.text.data import TextTasks
    from hf_tae.families.text.tokenization import tokenize_prompt_completion, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(PROMPTS + COMPLETIONS, vocab_size=60)
    records = [{"task": t, "split": split, "input": p, "target": c}
               for split in ("train", "validation", "test")
               for p, c, t in zip(PROMPTS, COMPLETIONS, TASKS, strict=True)]  # fmt: skip
    tasks = tokenize_prompt_completion(TextTasks.from_records(records, ["sort", "rev"]), tokenizer)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tasks, GPT2LMHeadModel(config)


def test_causal_generation_metrics_match_a_one_row_loop(tmp_path):
    """Prompts of different lengths in one batch (left padding, absolute positions): the
    trainer's completions must equal unpadded one-row generation."""
    from hf_tae.trainers.sft import SFTMultitaskTrainer

    tasks, model = _causal_setup()
    args = _args(tmp_path, max_steps=10, learning_rate=1e-2)
    trainer = SFTMultitaskTrainer(model=model, args=args, task_set=tasks)
    trainer.train()
    metrics = trainer.evaluate_tasks("test", generate=True)
    tokenizer = tasks.source.tokenizer

    def generate_one(row, max_new_tokens):
        prompt = row["input_ids"][: next(i for i, t in enumerate(row["labels"]) if t != -100)]
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        return out[0, len(prompt) :].tolist()

    model.eval()
    reference = _reference(tasks, "test", generate_one)
    _assert_matches(metrics, reference, "test")
    assert 0 < metrics["test_avg_rougeL"] < 1  # some completions right, some wrong


def test_missing_rouge_score_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_rouge(name, *args, **kwargs):
        if name.startswith("rouge_score"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rouge)
    with pytest.raises(TaeError, match=r"pip install hf-tae\[text\]"):
        GenerationTaskMetrics(["a"])


def test_group_training_scores_generated_targets_of_each_group_model(tmp_path):
    """``compare_group_training(..., generate_splits=("test",))`` (the job's
    ``--generation_metrics``): each task's ROUGE-L and generated exact match equal a one-row
    ``model.generate`` loop over its own group's kept model, scored by ``rouge_score``."""
    from hf_tae.evaluation.group_training import compare_group_training, summarize_group_training
    from hf_tae.hub import load_meta_init

    family, args, tasks = tiny_text_family("instructions", tmp_path / "base")
    names = tasks.task_names
    groups = [names[:3], names[3:]]
    out = tmp_path / "groups"
    table = compare_group_training(
        lambda: family.model_init(args, tasks), tasks, {"grouped": groups},
        _args(tmp_path, max_steps=30, learning_rate=3e-2), out, seeds=(0,),
        show_progress=False, trainer_class=family.trainer_class, keep_models=groups,
        generate_splits=("test",),
    )  # fmt: skip
    assert {"rougeL", "generated_exact_match"} <= set(table.columns)
    tokenizer = tasks.source.tokenizer
    for group in groups:
        model = load_meta_init(next((out / "models").glob(
            "-".join(str(names.index(t)) for t in group) + "_seed0")))  # fmt: skip
        model.eval()

        def generate_one(row, max_new_tokens, model=model):
            ids = model.generate(input_ids=torch.tensor([row["input_ids"]]),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id)  # fmt: skip
            return ids[0, 1:].tolist()

        reference = _reference(tasks.select(group), "test", generate_one)
        for name, (rouge, exact) in reference.items():
            row = table[table["task_name"] == name].iloc[0]
            assert row["rougeL"] == pytest.approx(rouge)
            assert row["generated_exact_match"] == pytest.approx(exact)
    summary = summarize_group_training(table)
    assert summary.loc["grouped", "rougeL"] == pytest.approx(table["rougeL"].mean())
    # validation rows were not generated: a second call scores them without generation columns
    validation = compare_group_training(
        lambda: family.model_init(args, tasks), tasks, {"grouped": groups},
        _args(tmp_path, max_steps=30, learning_rate=3e-2), out, seeds=(0,), split="validation",
        show_progress=False, trainer_class=family.trainer_class, generate_splits=("test",),
    )  # fmt: skip
    assert "rougeL" not in validation.columns


def test_generation_needs_a_trainer_that_generates(tmp_path):
    from hf_tae.evaluation.ground_truth import SubsetFineTuner, trainer_generates
    from hf_tae.trainers import MultitaskTrainer

    assert trainer_generates(get_family("instructions").trainer_class)
    assert not trainer_generates(MultitaskTrainer) and not trainer_generates(None)
    with pytest.raises(TaeError, match="needs a trainer that generates"):
        SubsetFineTuner(lambda: None, None, _args(tmp_path), tmp_path, generate_splits=["test"])
