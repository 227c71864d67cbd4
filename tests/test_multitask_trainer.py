"""MultitaskTrainer: per-task metrics against hand counts, subsets, best checkpoint, and that
meta-training on the default data clearly beats an untrained model and label-frequency baselines."""

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_tae import (
    MultiLabelTaskMetrics,
    MultitaskTrainer,
    MultitaskTrainingArguments,
    SignConfig,
    SignForMultiTaskNodeClassification,
    TaeError,
)
from hf_tae.trainers.baselines import label_frequency_baseline


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), learning_rate=1e-2, num_train_epochs=60, per_device_train_batch_size=256,
                    per_device_eval_batch_size=4096, use_cpu=True, disable_tqdm=True, seed=0, save_total_limit=1)  # fmt: skip
    defaults.update(kw)
    return MultitaskTrainingArguments(**defaults)


def _model(graph, hidden=8, seed=0):
    import torch

    torch.manual_seed(seed)
    config = SignConfig(in_features=graph.x.shape[1], num_hops=3, hidden_size=hidden, task_names=graph.task_names,
                        dropout=0.1, input_dropout=0.1)  # fmt: skip
    return SignForMultiTaskNodeClassification(config)


def test_metrics_match_hand_counted_confusion_matrices():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 3)), (rng.random((50, 3)) > 0.6).astype(np.float32)
    mask = rng.random((50, 3)) > 0.3
    mask[:, 2] = False  # a task with no rows is not reported
    out = MultiLabelTaskMetrics(["a", "b", "c"], threshold=0.2)(
        EvalPrediction(logits, (labels, mask))
    )
    for t, name in enumerate("ab"):
        y, p = labels[mask[:, t], t] > 0.5, logits[mask[:, t], t] > 0.2
        tp, fp, fn = (y & p).sum(), (~y & p).sum(), (y & ~p).sum()
        assert out[f"{name}_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert out[f"{name}_accuracy"] == pytest.approx((y == p).mean())
        prob = 1 / (1 + np.exp(-logits[mask[:, t], t]))
        assert out[f"{name}_log_loss"] == pytest.approx(
            -np.mean(np.where(y, np.log(prob), np.log(1 - prob)))
        )
    assert "c_f1" not in out
    assert out["avg_f1"] == pytest.approx((out["a_f1"] + out["b_f1"]) / 2)


def test_meta_training_clearly_beats_untrained_and_label_frequency(default_graph, tmp_path):
    task_set = default_graph.task_set(3)
    trainer = MultitaskTrainer(model=_model(default_graph), args=_args(tmp_path), task_set=task_set)
    untrained = trainer.evaluate_tasks("test")
    trainer.train()
    trained = trainer.evaluate_tasks("test")
    baseline = label_frequency_baseline(task_set, "test")
    names = task_set.task_names
    trained_f1 = np.array([trained[f"test_{t}_f1"] for t in names])
    assert trained["test_avg_f1"] > untrained["test_avg_f1"] + 0.3
    assert trained["test_avg_f1"] > np.mean(list(baseline.values())) + 0.3
    assert (
        np.mean(trained_f1 > np.array([baseline[t] for t in names])) >= 0.9
    )  # per task, not just on average
    # the best checkpoint is the one with the best validation average F1
    history = [log["eval_avg_f1"] for log in trainer.state.log_history if "eval_avg_f1" in log]
    assert trainer.state.best_metric == pytest.approx(max(history))


def test_training_on_a_subset_reports_and_learns_only_that_subset(small_graph, tmp_path):
    task_set = small_graph.task_set(3)
    model = _model(small_graph)
    head_before = model.head[-1].weight.detach().clone()
    args = _args(
        tmp_path, tasks=["g0_c0", "g1_c2"], num_train_epochs=3, task_balanced_sampling=True
    )
    trainer = MultitaskTrainer(model=model, args=args, task_set=task_set)
    trainer.train()
    metrics = trainer.evaluate()
    reported = {
        k[len("eval_") : -len("_f1")] for k in metrics if k.endswith("_f1") and "avg" not in k
    }
    assert reported == {"g0_c0", "g1_c2"}
    moved = (trainer.model.head[-1].weight.detach() - head_before).abs().sum(1)
    assert (
        moved[[1, 2, 3, 4]].sum() == 0 and moved[[0, 5]].min() > 0
    )  # unselected task heads untouched


def test_model_width_must_match_label_matrix(small_graph, tmp_path):
    config = SignConfig(in_features=small_graph.x.shape[1], num_hops=3, hidden_size=4, num_tasks=3)
    with pytest.raises(TaeError, match="the model has 3 task outputs but the task set has 6 tasks"):
        MultitaskTrainer(model=SignForMultiTaskNodeClassification(config), args=_args(tmp_path),
                         task_set=small_graph.task_set(3))  # fmt: skip


def test_single_label_metrics_match_sklearn():
    from scipy.special import log_softmax
    from sklearn.metrics import accuracy_score, f1_score

    from hf_tae.trainers.metrics import SingleLabelTaskMetrics

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(60, 4))
    labels = rng.integers(0, 4, 60)
    task = rng.integers(0, 3, 60)
    task[task == 2] = 0  # task "c" has no rows: not reported
    out = SingleLabelTaskMetrics(["a", "b", "c"])(EvalPrediction(logits, (labels, task)))
    for t, name in enumerate("ab"):
        rows = task == t
        y, z = labels[rows], logits[rows]
        assert out[f"{name}_accuracy"] == pytest.approx(accuracy_score(y, z.argmax(1)))
        assert out[f"{name}_f1"] == pytest.approx(
            f1_score(y, z.argmax(1), average="macro", labels=np.unique(y), zero_division=0)
        )
        # cross-entropy from log-softmax, computed independently of sklearn's log_loss
        assert out[f"{name}_log_loss"] == pytest.approx(
            -np.mean(log_softmax(z, axis=1)[np.arange(len(y)), y]), rel=1e-9
        )
    assert "c_f1" not in out
    assert out["avg_accuracy"] == pytest.approx((out["a_accuracy"] + out["b_accuracy"]) / 2)


def test_gradient_accumulation_matches_one_large_batch(small_graph, tmp_path):
    """SIGN's loss is a batch mean: two accumulated half-batches take (up to the halves' unequal
    numbers of selected pairs) the step of one batch, not twice it."""
    import torch

    task_set = small_graph.task_set(3)
    params = []
    for batch, accumulation in ((64, 1), (32, 2)):
        torch.manual_seed(0)
        model = _model(small_graph)
        model.config.dropout = model.config.input_dropout = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        args = _args(tmp_path / f"b{batch}", per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                     learning_rate=1.0, eval_strategy="no", save_strategy="no",
                     load_best_model_at_end=False, lr_scheduler_type="constant")  # fmt: skip
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        trainer = MultitaskTrainer(model=model, args=args, task_set=task_set)
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    full, accumulated = params
    assert (accumulated - full).norm() < 0.1 * full.norm()  # without scaling: ≈ 1.0 × full
