"""The seq2seq multitask trainer, its metrics and collator, and gradients through the text
family's batches: against hand counts, greedy decoding and per-example autograd."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from text_helpers import tiny_text_family

from hf_tae.gradients.capture import ProjectedGradientCapture
from hf_tae.models.scores import TokenLogOddsScore
from hf_tae.trainers.seq2seq import Seq2SeqCollator, Seq2SeqTaskMetrics, reduce_logits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family_setup(tmp_path_factory):
    """(family, args, task set, LoRA T5) on a small digit-skills default."""
    family, args, tasks = tiny_text_family("instructions", tmp_path_factory.mktemp("base"))
    torch.manual_seed(0)
    return family, args, tasks, family.model_init(args, tasks)


def test_metrics_against_hand_counts():
    V = 4
    labels = np.array([[1, 2, -100], [3, 0, 0], [2, -100, -100], [1, 1, 1]])
    argmax = np.array([[1, 2, 3], [3, 1, 0], [0, 0, 0], [1, 1, 1]])  # rows 0, 3 exact; row 1 2/3
    logits = np.full((4, 3, V), -5.0)
    np.put_along_axis(logits, argmax[..., None], 5.0, axis=-1)
    task = np.array([0, 0, 1, 0])
    out = Seq2SeqTaskMetrics(["a", "b"]).per_task(logits, labels, task)
    assert out["a"]["accuracy"] == pytest.approx(2 / 3) and out["b"]["accuracy"] == 0.0
    assert out["a"]["f1"] == pytest.approx((1 + 2 / 3 + 1) / 3) and out["b"]["f1"] == 0.0
    # per token: -log softmax; the argmax has p = e^5 / (e^5 + 3 e^-5)
    hit, miss = np.log1p(3 * np.exp(-10)), 10 + np.log1p(3 * np.exp(-10))
    assert out["a"]["log_loss"] == pytest.approx((hit + (2 * hit + miss) / 3 + hit) / 3)
    assert out["b"]["log_loss"] == pytest.approx(miss) and out["a"]["support"] == 3
    reduced = reduce_logits(
        torch.as_tensor(logits), (torch.as_tensor(labels), torch.as_tensor(task))
    )
    again = Seq2SeqTaskMetrics(["a", "b"], task_ids=[1]).per_task(reduced.numpy(), labels, task)
    assert list(again) == ["b"] and again["b"] == pytest.approx(out["b"])


def test_collator_pads_and_serves_as_collate_fn(family_setup):
    _, _, tasks, _ = family_setup
    pad = tasks.source.pad_token_id
    rows = np.array([0, 5])
    batch = Seq2SeqCollator()(tasks, rows)
    for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100)):
        for i, r in enumerate(rows):
            seq = tasks.dataset[int(r)][key]
            assert batch[key][i, : len(seq)].tolist() == seq
            assert (batch[key][i, len(seq) :] == fill).all()
    assert "task" not in batch
    features = [dict(tasks.dataset[int(r)]) for r in rows]
    assert Seq2SeqCollator(pad)(features)["task"].tolist() == [
        features[0]["task"],
        features[1]["task"],
    ]


def test_teacher_forced_exact_match_is_greedy_decoding(family_setup):
    _, _, tasks, model = family_setup
    model.eval()
    batch = Seq2SeqCollator()(tasks, np.arange(6))
    with torch.no_grad():
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=4, min_new_tokens=4, do_sample=False)[:, 1:].contiguous()  # fmt: skip
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=generated).logits  # fmt: skip
    task = np.zeros(6, dtype=int)
    metrics = Seq2SeqTaskMetrics(["t"])
    assert metrics.per_task(logits.numpy(), generated.numpy(), task)["t"]["accuracy"] == 1.0
    changed = generated.clone()
    changed[:, -1] = (changed[:, -1] + 1) % logits.shape[-1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=changed).logits  # fmt: skip
    scores = metrics.per_task(logits.numpy(), changed.numpy(), task)["t"]
    assert scores["accuracy"] == 0.0 and scores["f1"] == pytest.approx(3 / 4)


def test_trainer_metrics_match_a_hand_loop(family_setup, tmp_path):
    family, _, tasks, model = family_setup
    from hf_tae.trainers import MultitaskTrainingArguments

    args = MultitaskTrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                      per_device_eval_batch_size=5, eval_strategy="no", save_strategy="no",
                                      load_best_model_at_end=False, report_to=[], disable_tqdm=True,
                                      learning_rate=1e-2)  # fmt: skip
    trainer = family.trainer_class(model=model, args=args, task_set=tasks)
    trainer.train()
    metrics = trainer.evaluate_tasks("test")
    model.eval()
    for name in tasks.task_names:
        rows = tasks.rows(name, "test")
        exact, token_acc, loss = [], [], []
        for r in rows:  # one example at a time, no padding
            row = tasks.dataset[int(r)]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row["input_ids"]]),
                               labels=torch.tensor([row["labels"]])).logits[0]  # fmt: skip
            gold = torch.tensor(row["labels"])
            hits = logits.argmax(-1) == gold
            exact.append(bool(hits.all()))
            token_acc.append(hits.float().mean().item())
            loss.append(torch.nn.functional.cross_entropy(logits, gold).item())
        assert metrics[f"test_{name}_accuracy"] == pytest.approx(np.mean(exact))
        assert metrics[f"test_{name}_f1"] == pytest.approx(np.mean(token_acc))
        assert metrics[f"test_{name}_log_loss"] == pytest.approx(np.mean(loss), rel=1e-4)


def test_lora_gradients_through_the_family_batches_equal_per_example_autograd(family_setup):
    import copy

    family, args, tasks, model = family_setup
    model = copy.deepcopy(model).double().eval()
    torch.manual_seed(1)
    with torch.no_grad():  # nonzero B so that both adapter factors have gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    rows = np.array([0, 7, 13, 20])
    batch = family.collate_fn(args)(tasks, rows)
    score = family.score_function(args)
    assert isinstance(score, TokenLogOddsScore) and not score.shift and not score.first_token
    capture = ProjectedGradientCapture(model, dtype=torch.float64, kind="dense", dim=16)
    names = [n for n, _ in capture.parameters]
    assert names and all("lora_" in n for n in names)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "modules .* ran on inputs without the batch")
        with capture:
            z = capture.per_example(score(model(**batch), batch))
    params = dict(model.named_parameters())
    reference = []
    for r in rows:  # each example alone, unpadded
        row = tasks.dataset[int(r)]
        single = {
            "input_ids": torch.tensor([row["input_ids"]]),
            "labels": torch.tensor([row["labels"]]),
        }
        s = score(model(**single), single)[0]
        grads = torch.autograd.grad(s, [params[n] for n in names])
        reference.append(
            sum(
                g.flatten() @ capture.projector.matrix_block(n)
                for n, g in zip(names, grads, strict=True)
            )
        )
    reference = torch.stack(reference)
    assert z.abs().max() > 0
    assert torch.allclose(z, reference, rtol=1e-8, atol=1e-10 * reference.abs().max().item())


def test_family_is_registered_with_planted_groups_and_a_majority_answer_baseline(family_setup):
    from collections import Counter

    from hf_tae.families import family_names

    family, _, tasks, _ = family_setup
    assert "instructions" in family_names()
    assert family.planted_groups(tasks).tolist() == [0, 0, 0, 1, 1, 1]
    assert family.planted_groups(tasks.select(["zero_1", "max_2"])).tolist() == [1, 0]
    baseline = family.baseline(tasks, "test")
    data = tasks.source.text_tasks.dataset.to_pandas()
    for t, name in enumerate(tasks.task_names):
        train = data[(data.task == t) & (data.split == "train")].target
        test = data[(data.task == t) & (data.split == "test")].target
        counts = Counter(train)
        tied = [a for a, c in counts.items() if c == max(counts.values())]
        # the best input-blind predictor is at least the most frequent training answer
        assert min((test == a).mean() for a in tied) - 1e-12 <= baseline[name] <= 1.0


def test_lora_targets_that_match_nothing_list_the_module_names(family_setup):
    import dataclasses

    from hf_tae.errors import TaeError

    family, args, tasks, _ = family_setup
    with pytest.raises(TaeError, match=r"match no module.*'wo'"):
        family.model_init(dataclasses.replace(args, lora_target_modules=["q_proj"]), tasks)
