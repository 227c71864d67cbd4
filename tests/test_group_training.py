"""compare_group_training: partitions checked, runs shared between strategies, scores taken from
the right group's model (read back from the raw results file), summaries recomputed by hand."""

import json

import pandas as pd
import pytest

from hf_tae import (
    MultitaskTrainingArguments,
    SignConfig,
    SignForMultiTaskNodeClassification,
    TaeError,
)
from hf_tae.evaluation import compare_group_training, summarize_group_training


@pytest.fixture(scope="module")
def task_set(tiny_graph):
    return tiny_graph.task_set(num_hops=2)


def _model_init(graph):
    def init():
        config = SignConfig(in_features=6, num_hops=2, hidden_size=4, task_names=graph.task_names,
                            dropout=0.1, input_dropout=0.1)  # fmt: skip
        return SignForMultiTaskNodeClassification(config)

    return init


def _args(path):
    return MultitaskTrainingArguments(output_dir=str(path), learning_rate=1e-2, num_train_epochs=2,
                                      per_device_train_batch_size=64, lr_scheduler_type="constant",
                                      use_cpu=True, disable_tqdm=True, report_to="none")  # fmt: skip


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([["g0_c0", "g0_c1"], ["g1_c0"]], r"missing \['g1_c1'\]"),
        ([["g0_c0", "g0_c1"], ["g1_c0", "g1_c1", "g0_c0"]], r"repeated \['g0_c0'\]"),
        (["g0_c0", "g0_c1"], "must be a list of task lists"),
    ],
)
def test_rejects_strategies_that_are_not_partitions(
    tiny_graph, task_set, tmp_path, groups, message
):
    with pytest.raises(TaeError, match=message):
        compare_group_training(_model_init(tiny_graph), task_set, {"bad": groups},
                               _args(tmp_path / "r"), tmp_path)  # fmt: skip
    with pytest.raises(TaeError, match="strategies is empty"):
        compare_group_training(_model_init(tiny_graph), task_set, {}, _args(tmp_path), tmp_path)


def test_each_task_is_scored_by_its_own_groups_model_and_runs_are_shared(
    tiny_graph, task_set, tmp_path
):
    names = tiny_graph.task_names
    strategies = {
        "pairs": [["g0_c0", "g0_c1"], ["g1_c0", "g1_c1"]],
        "mixed": [["g0_c0"], ["g0_c1", "g1_c0", "g1_c1"]],
        "single": [[t] for t in names],
    }
    table = compare_group_training(_model_init(tiny_graph), task_set, strategies,
                                   _args(tmp_path / "r"), tmp_path, seeds=(0, 1), split="test",
                                   show_progress=False)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    # {g0_c0} is both a single and a "mixed" group: 7 distinct subsets × 2 seeds, not 8 × 2
    assert len(records) == 14
    assert {r["split"] for r in records} == {"test"}
    raw = {}
    for r in records:
        for row in r["rows"]:
            raw.setdefault((tuple(r["subset"]), row["task_name"]), {})[r["seed"]] = row["f1"]
    # by_seed: the same runs, one row per seed (nothing trained again)
    per_seed = compare_group_training(_model_init(tiny_graph), task_set, strategies,
                                      _args(tmp_path / "r"), tmp_path, seeds=(0, 1),
                                      split="test", show_progress=False, by_seed=True)  # fmt: skip
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 14
    for strategy, groups in strategies.items():
        for group in groups:
            key = tuple(sorted(names.index(t) for t in group))
            for task in group:
                got = table[(table.strategy == strategy) & (table.task_name == task)]
                assert len(got) == 1 and got["group"].iloc[0] == [names[t] for t in key]
                expected = sum(raw[key, task].values()) / 2
                assert got["f1"].iloc[0] == pytest.approx(expected, abs=1e-12)
                rows = per_seed[(per_seed.strategy == strategy) & (per_seed.task_name == task)]
                assert rows.set_index("seed")["f1"].to_dict() == pytest.approx(raw[key, task])


def test_summary_means_gains_and_wins_by_hand():
    rows = []
    scores = {"all": [0.5, 0.6, 0.7], "grouped": [0.6, 0.6, 0.8], "single": [0.1, 0.7, 0.2]}
    for strategy, f1s in scores.items():
        for task, f1 in enumerate(f1s):
            group = ["a", "b", "c"] if strategy == "all" else [str(task)]
            rows.append({"strategy": strategy, "task": task, "task_name": str(task), "group": group,
                         "group_size": len(group), "f1": f1, "accuracy": f1, "log_loss": 1 - f1})  # fmt: skip
    summary = summarize_group_training(pd.DataFrame(rows), reference="all")
    assert summary.loc["grouped", "f1"] == pytest.approx(2.0 / 3)
    assert summary.loc["grouped", "gain"] == pytest.approx(2.0 / 3 - 0.6)
    assert summary.loc["grouped", "wins"] == 2  # the tie on task 1 is not a win
    assert summary.loc["single", "wins"] == 1
    assert summary.loc["all", "num_models"] == 1 and summary.loc["single", "num_models"] == 3
    with pytest.raises(TaeError, match="reference 'nope'"):
        summarize_group_training(pd.DataFrame(rows), reference="nope")


def test_run_steps_gives_every_group_the_same_optimizer_steps(tiny_graph, task_set, tmp_path):
    """By epochs a run's steps grow with its rows; with ``--run_steps`` a one-task group and the
    all-tasks group take exactly that many optimizer steps (counted by a callback)."""
    from transformers import TrainerCallback

    from hf_tae import MultitaskTrainer
    from hf_tae.pipeline.arguments import GroupingArguments
    from hf_tae.pipeline.stages import run_arguments

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.steps += 1

    def steps(args, tasks):
        CountSteps.steps = 0
        trainer = MultitaskTrainer(model=_model_init(tiny_graph)(), args=args,
                                   task_set=task_set.select(tasks), callbacks=[CountSteps()])  # fmt: skip
        trainer.train()
        return CountSteps.steps

    one, every = [tiny_graph.task_names[0]], list(tiny_graph.task_names)
    base = _args(tmp_path)
    by_epochs = run_arguments(base, GroupingArguments().run_steps)
    assert steps(by_epochs, one) < steps(by_epochs, every)  # the size bias --run_steps removes
    fixed = run_arguments(base, GroupingArguments(run_steps=7).run_steps)
    assert steps(fixed, one) == steps(fixed, every) == 7


def test_init_fingerprint_follows_the_saved_meta_initialization(tiny_graph, task_set, tmp_path):
    """Group training from θ0 records which θ0: resaving the same weights keeps the fingerprint,
    one changed weight or a missing meta_init/ changes it."""
    import torch

    from hf_tae.families import get_family
    from hf_tae.pipeline.stages import init_fingerprint

    family = get_family("graph")
    model = _model_init(tiny_graph)()
    model.save_pretrained(tmp_path / "meta_init")
    first = init_fingerprint(family, None, task_set, tmp_path, "meta")
    model.save_pretrained(tmp_path / "meta_init")
    assert init_fingerprint(family, None, task_set, tmp_path, "meta") == first
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    model.save_pretrained(tmp_path / "meta_init")
    assert init_fingerprint(family, None, task_set, tmp_path, "meta") != first
    assert init_fingerprint(family, None, task_set, tmp_path / "nowhere", "meta") != first


def test_validated_groups_split_the_groups_that_validate_better_alone():
    """A group is split into single tasks exactly when the mean over its tasks of the metric is
    better under the single-task models than under the group's model (lower is better for
    log_loss; a tie keeps the group); None when no group is split."""
    import pandas as pd

    from hf_tae import validated_groups

    groups = [["a", "b"], ["c", "d"], ["e"]]
    together = {"a": 0.8, "b": 0.6, "c": 0.5, "d": 0.5, "e": 0.9}
    alone = {"a": 0.5, "b": 0.8, "c": 0.7, "d": 0.4, "e": 0.1}  # a, b: 0.65 < 0.7; c, d: 0.55 > 0.5
    rows = [{"strategy": "grouped", "task_name": t, "f1": v, "log_loss": 1 - v}
            for t, v in together.items()]
    rows += [{"strategy": "single task", "task_name": t, "f1": v, "log_loss": 1 - v}
             for t, v in alone.items()]
    table = pd.DataFrame(rows)
    assert validated_groups(table, groups, "f1") == [["a", "b"], ["c"], ["d"], ["e"]]
    assert validated_groups(table, groups, "log_loss") == [["a", "b"], ["c"], ["d"], ["e"]]
    tie = table.assign(f1=[0.7, 0.6, 0.5, 0.5, 0.9, 0.7, 0.6, 0.5, 0.5, 0.1])
    assert validated_groups(tie, groups, "f1") is None
    # per seed (compare_group_training(..., by_seed=True)): split only when every seed agrees;
    # seed 1 has {c, d} better together (0.6 > 0.55), so only {a, b}'s verdict could change
    seed1 = table.assign(seed=1)
    seed1.loc[seed1["task_name"].isin(["c", "d"]) & (seed1["strategy"] == "grouped"), "f1"] = 0.6
    both = pd.concat([table.assign(seed=0), seed1], ignore_index=True)
    assert validated_groups(both, groups, "f1") is None  # the mean over seeds would still split
    seed1.loc[seed1["task_name"].isin(["c", "d"]) & (seed1["strategy"] == "grouped"), "f1"] = 0.54
    both = pd.concat([table.assign(seed=0), seed1], ignore_index=True)
    assert validated_groups(both, groups, "f1") == [["a", "b"], ["c"], ["d"], ["e"]]


def test_validate_groups_flag_offers_the_validated_groups_or_leaves_them_out(
    tiny_graph, task_set, tmp_path, monkeypatch
):
    """--validate_groups (default) adds the split that ``validated_groups`` returns as a
    strategy and a recommendation candidate, scored from the runs already trained (the pair's
    tasks by their single-task models); ``--validate_groups false`` leaves it out."""
    from hf_tae.evaluation import group_training
    from hf_tae.pipeline.arguments import GroupingArguments
    from hf_tae.pipeline.stages import train_groups

    names = tiny_graph.task_names
    groups = [names[:2], names[2:]]
    split = [names[:2], [names[2]], [names[3]]]
    monkeypatch.setattr(group_training, "validated_groups", lambda table, groups, metric: split)

    def run(validate):
        args = GroupingArguments(group_seeds=[0], validate_groups=validate)
        return train_groups(_model_init(tiny_graph), task_set, groups, _args(tmp_path / "r"),
                            args, tmp_path, None, "f1")  # fmt: skip

    on = run(True)
    assert on["validated_groups"] == split and "validated groups" in on["recommended"]["validation"]
    for t in names:  # each task scored by the model of its validated group: no new run
        source = "grouped" if t in names[:2] else "single task"
        assert on["per_task"][t]["validated groups"] == pytest.approx(on["per_task"][t][source])
    off = run(False)
    assert off["validated_groups"] is None and "validated groups" not in off["summary"]
    assert set(off["recommended"]["validation"]) == {"grouped", "all tasks", "single task"}
