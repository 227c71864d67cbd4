"""The pipeline's merging stage (``--merge_methods``) on the graph family: the merged model
against a hand average of the group models' saved weights, its per-task scores against a
direct evaluation of that hand-built model, RegMean against its closed form on Grams built by
hand from each group's training rows, and a rerun that keeps the finished merges."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_tae import (
    MultitaskTrainer,
    MultitaskTrainingArguments,
    SignConfig,
    SignForMultiTaskNodeClassification,
    TaeError,
)
from hf_tae.families import get_family
from hf_tae.pipeline import stages
from hf_tae.pipeline.arguments import EstimationArguments, GroupingArguments, check_arguments

GROUPS = [["g0_c0", "g0_c1"], ["g1_c0", "g1_c1"]]  # global task ids 0, 1 and 2, 3
HEAD = ("head.3.weight", "head.3.bias")  # the SIGN head's last layer: one row per task


@pytest.fixture(scope="module")
def task_set(tiny_graph):
    return tiny_graph.task_set(num_hops=2)


def _init(graph):
    def init():
        config = SignConfig(in_features=6, num_hops=2, hidden_size=4, task_names=graph.task_names,
                            dropout=0.1, input_dropout=0.1)  # fmt: skip
        return SignForMultiTaskNodeClassification(config)

    return init


def _args(path):
    return MultitaskTrainingArguments(output_dir=str(path), learning_rate=1e-2, num_train_epochs=3,
                                      per_device_train_batch_size=32, lr_scheduler_type="constant",
                                      use_cpu=True, disable_tqdm=True, report_to="none")  # fmt: skip


def _train(graph, task_set, out):
    grouping = GroupingArguments(merge_methods=["average", "regmean"], compare_single_tasks=False)
    return stages.train_groups(_init(graph), task_set, GROUPS, _args(out / "args"), grouping, out,
                               None, "f1", MultitaskTrainer,
                               private_parameters=get_family("graph").private_parameters)  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_graph, task_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge_stage")
    return out, _train(tiny_graph, task_set, out)


def _group_weights(out):
    folder = out / "group_training" / "models"
    return [load_file(folder / name / "model.safetensors") for name in ("0-1_seed0", "2-3_seed0")]


def _hand_average(out):
    """Shared tensors averaged (in float64, as one would by hand), head rows of each task from
    its own group's model."""
    g0, g1 = _group_weights(out)
    hand = {k: ((g0[k].double() + g1[k].double()) / 2).to(g0[k].dtype) for k in g0}
    for name in HEAD:
        hand[name] = torch.cat([g0[name][:2], g1[name][2:]])
    return hand


def test_average_is_the_hand_average_with_each_tasks_own_head(run):
    out, info = run
    merged = load_file(out / "merged" / "average" / "model.safetensors")
    hand = _hand_average(out)
    assert merged.keys() == hand.keys()
    for name, tensor in hand.items():
        assert torch.equal(merged[name], tensor), name
    g0, g1 = _group_weights(out)
    assert not torch.equal(g0["hops.0.0.weight"], g1["hops.0.0.weight"])  # a real merge
    assert info["merged"]["average"]["private"] == len(HEAD)
    record = json.loads((out / "merged" / "average" / "merge_config.json").read_text())
    assert record["merge_method"] == "average" and record["fingerprint"]


def test_merged_rows_score_like_a_direct_evaluation_of_the_hand_average(run, tiny_graph, task_set):
    out, info = run
    model = _init(tiny_graph)()
    model.load_state_dict(_hand_average(out))
    trainer = MultitaskTrainer(model=model, args=_args(out / "direct"), task_set=task_set)
    test, validation = trainer.evaluate_tasks("test"), trainer.evaluate_tasks("validation")
    names = tiny_graph.task_names
    for name in names:
        assert info["per_task"][name]["merged (average)"] == pytest.approx(test[f"test_{name}_f1"])
    row = info["summary"]["merged (average)"]
    assert row["num_models"] == 1
    for metric in ("f1", "accuracy", "log_loss"):
        direct = sum(test[f"test_{n}_{metric}"] for n in names) / len(names)
        assert row[metric] == pytest.approx(direct)
    direct_val = sum(validation[f"eval_{n}_f1"] for n in names) / len(names)
    assert info["merged"]["average"]["validation"] == pytest.approx(direct_val)
    # wins against one model on all tasks, counted by hand
    wins = sum(test[f"test_{n}_f1"] > info["per_task"][n]["all tasks"] for n in names)
    assert row["wins"] == wins
    assert set(info["summary"]) == {"grouped", "all tasks", "merged (average)",
                                    "merged (regmean)"}  # fmt: skip


def test_regmean_matches_its_closed_form_on_each_groups_training_rows(run, task_set):
    """hops.0.0 reads the raw hop-0 features: its Gram is XᵀX/n over the group's training rows."""
    out, _ = run
    merged = load_file(out / "merged" / "regmean" / "model.safetensors")
    alpha, name = 0.9, "hops.0.0.weight"
    lhs, rhs = 0, 0
    for weights, group in zip(_group_weights(out), GROUPS, strict=True):
        rows = task_set.select(group).trainer_dataset("train")
        x = torch.stack([torch.as_tensor(r) for r in rows["hop_features"]]).double()[:, 0, :]
        gram = x.T @ x / len(x)
        gram = alpha * gram + (1 - alpha) * torch.diag(torch.diag(gram))
        lhs = lhs + gram
        rhs = rhs + gram @ weights[name].double().T
    expected = torch.linalg.solve(lhs, rhs).T
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)
    hand = _hand_average(out)  # heads are the tasks' own, whatever the method
    for head in HEAD:
        assert torch.equal(merged[head], hand[head])


def test_rerun_keeps_finished_merges_without_new_statistics(run, tiny_graph, task_set,
                                                            monkeypatch):  # fmt: skip
    out, first = run
    files = [out / "merged" / m / "model.safetensors" for m in ("average", "regmean")]
    stamps = [os.stat(f).st_mtime_ns for f in files]

    def refuse(*_args, **_kwargs):
        raise AssertionError("statistics recomputed for a finished merge")

    monkeypatch.setattr("hf_tae.merging.groups.group_statistics", refuse)
    again = _train(tiny_graph, task_set, out)
    assert all(again["merged"][m]["skipped"] for m in ("average", "regmean"))
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
    assert again["per_task"] == first["per_task"]
    assert not list((out / "merged").glob(".*.partial"))


def test_bad_merge_methods_fail_before_training():
    est = EstimationArguments()
    with pytest.raises(TaeError, match="unknown merge method 'avg'"):
        check_arguments(est, GroupingArguments(merge_methods=["avg"]))
    with pytest.raises(TaeError, match="--train_groups"):
        check_arguments(est, GroupingArguments(merge_methods=["average"], train_groups=False))


def test_report_shows_the_merged_rows(run):
    from hf_tae.pipeline.report import render_report

    _, info = run
    labels = {"f1": "F1", "accuracy": "accuracy", "log_loss": "BCE"}
    results = {"family": "graph", "data": "tiny", "command": "test", "world_size": 1,
               "timings": {}, "metrics": {"selection": "f1", "labels": labels},
               "meta_init": {"test_avg": 0.5}, "group_training": info}  # fmt: skip
    text = render_report(results)
    row = info["summary"]["merged (regmean)"]
    assert f"| merged (regmean) | 1 | {row['f1']:.3f} | {row['accuracy']:.3f} |" in text
    assert "each task's private parameters (its head) taken from its own group's model" in text
    header = "| task | " + " | ".join(info["summary"]) + " |"
    assert header in text


def test_a_missing_group_model_is_trained_again_and_merged_again(tiny_graph, task_set, tmp_path):
    first = _train(tiny_graph, task_set, tmp_path)
    results = (tmp_path / "group_training" / "results.jsonl").read_text()
    before = load_file(tmp_path / "merged" / "average" / "model.safetensors")
    folder = tmp_path / "group_training" / "models" / "2-3_seed0"
    weights = load_file(folder / "model.safetensors")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    again = _train(tiny_graph, task_set, tmp_path)
    assert (tmp_path / "group_training" / "results.jsonl").read_text() == results  # no new runs
    retrained = load_file(folder / "model.safetensors")  # the same run, so the same weights
    assert all(torch.equal(retrained[k], weights[k]) for k in weights)
    assert not again["merged"]["average"]["skipped"]  # a new input file: merged again
    after = load_file(tmp_path / "merged" / "average" / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert again["per_task"] == first["per_task"]
