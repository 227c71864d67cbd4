"""SubsetFineTuner against hand-run MultitaskTrainer fits, its resume logic, and the
affinity/result comparisons against numpy and scipy."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hf_tae import (
    AffinityMatrix,
    MultitaskTrainer,
    MultitaskTrainingArguments,
    SignConfig,
    SignForMultiTaskNodeClassification,
    TaeError,
)
from hf_tae.estimation.compare import (
    compare_affinities,
    compare_results,
    corrected_spearman,
    self_agreement,
)
from hf_tae.evaluation.ground_truth import COLUMNS, SubsetFineTuner, average_seeds

SUBSETS = [[0, 1], [1, 2, 3]]


@pytest.fixture(scope="module")
def graph(tiny_graph):
    return tiny_graph


@pytest.fixture(scope="module")
def task_set(graph):
    return graph.task_set(num_hops=2)


class ModelInit:
    """A counting model_init: a fresh tiny SIGN model."""

    def __init__(self, graph):
        self.graph, self.calls = graph, 0

    def __call__(self):
        self.calls += 1
        config = SignConfig(in_features=6, num_hops=2, hidden_size=4, task_names=self.graph.task_names,
                            dropout=0.1, input_dropout=0.1)  # fmt: skip
        return SignForMultiTaskNodeClassification(config)


def _args(path, **kw):
    kw = {"learning_rate": 1e-2, "per_device_eval_batch_size": 4096, **kw}
    return MultitaskTrainingArguments(output_dir=str(path), num_train_epochs=2,
                                      per_device_train_batch_size=64,
                                      lr_scheduler_type="constant", use_cpu=True, disable_tqdm=True,
                                      report_to="none", **kw)  # fmt: skip


@pytest.fixture(scope="module")
def finished(graph, task_set, tmp_path_factory):
    """A tuner that has run SUBSETS with seed 0, and its table."""
    out = tmp_path_factory.mktemp("ground_truth")
    init = ModelInit(graph)
    tuner = SubsetFineTuner(init, task_set, _args(out / "unused"), out, seeds=(0,))
    return tuner, init, tuner.run(SUBSETS, show_progress=False)


def test_table_matches_hand_trained_multitask_runs(graph, task_set, finished, tmp_path):
    from transformers import set_seed

    tuner, init, table = finished
    assert init.calls == len(SUBSETS)
    assert list(table.columns) == [*COLUMNS, "seed"]
    assert [(r.subset_id, r.task) for r in table.itertuples()] == [
        (i, t) for i, s in enumerate(SUBSETS) for t in s
    ]
    assert not (tuner.output_dir / "runs").exists()
    counts = task_set.task_counts("validation")
    for i, subset in enumerate(SUBSETS):
        set_seed(0)
        model = ModelInit(graph)()
        args = _args(tmp_path / str(i), seed=0, eval_strategy="no", save_strategy="no",
                     load_best_model_at_end=False)  # fmt: skip
        trainer = MultitaskTrainer(model=model, args=args, task_set=task_set.select(subset))
        trainer.train()
        metrics = trainer.evaluate_tasks("validation")
        rows = table[table["subset_id"] == i]
        for row in rows.itertuples():
            name = graph.task_names[row.task]
            assert row.subset == subset and row.task_name == name and row.seed == 0
            assert row.num_rows == counts[name]
            assert row.f1 == pytest.approx(metrics[f"eval_{name}_f1"])
            assert row.accuracy == pytest.approx(metrics[f"eval_{name}_accuracy"])
            assert row.log_loss == pytest.approx(metrics[f"eval_{name}_log_loss"])


def test_read_runs_gives_the_finished_table_without_training(finished, tmp_path):
    """The table read back from disk is the one ``run`` returned (itself checked against
    hand-trained runs above); an empty folder names what to run first."""
    from hf_tae import TaeError, read_runs

    tuner, _, table = finished
    again = read_runs([tuner.output_dir])
    pd.testing.assert_frame_equal(again[again["subset_id"] < len(SUBSETS)], table)
    with pytest.raises(TaeError, match="no finished 'validation' runs in .*--ground_truth"):
        read_runs([tmp_path])


def test_resume_trains_only_new_subsets_and_ignores_a_partial_line(graph, task_set, finished):
    tuner, _, table = finished
    assert tuner.pending(SUBSETS) == [] and tuner.pending(SUBSETS, split="test") == [
        (tuple(sorted(s)), 0) for s in SUBSETS]  # scored on validation only  # fmt: skip
    with tuner.results_path.open("a") as handle:
        handle.write('{"subset": [0, 3], "seed": 0, "spl')  # a crash mid-append
    init = ModelInit(graph)
    again = SubsetFineTuner(init, task_set, tuner.args, tuner.output_dir, seeds=(0,))
    more = again.run([*SUBSETS, ["g1_c0", 0]], show_progress=False)
    assert init.calls == 1
    pd.testing.assert_frame_equal(more[more["subset_id"] < len(SUBSETS)], table)
    assert more[more["subset_id"] == 2]["subset"].tolist() == [[0, 2], [0, 2]]
    lines = tuner.results_path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


def test_extra_splits_are_scored_by_the_same_runs(graph, task_set, finished, tmp_path):
    """One call trains and scores test and validation; a second call for validation trains
    nothing and equals the validation table of runs trained for validation alone."""
    _, _, validation = finished  # SUBSETS, seed 0, scored on validation
    init = ModelInit(graph)
    tuner = SubsetFineTuner(init, task_set, _args(tmp_path / "unused"), tmp_path, seeds=(0,))
    test = tuner.run(SUBSETS, split="test", show_progress=False, extra_splits=("validation",))
    assert init.calls == len(SUBSETS) and set(test.columns) == {*COLUMNS, "seed"}
    again = tuner.run(SUBSETS, split="validation", show_progress=False)
    assert init.calls == len(SUBSETS)  # nothing trained
    pd.testing.assert_frame_equal(again, validation)
    assert not test[["f1", "log_loss"]].equals(again[["f1", "log_loss"]])  # another split's rows


def test_a_folder_of_runs_refuses_other_settings(graph, task_set, tmp_path):
    """Runs are reused only with the settings they were trained with: other weight-changing
    arguments or another starting model raise and name the change; arguments that only move
    where a run logs or evaluates are reused; results without settings.json are refused."""
    init = ModelInit(graph)
    SubsetFineTuner(init, task_set, _args(tmp_path / "a"), tmp_path, fingerprint="m0").run(
        [[0, 1]], show_progress=False
    )
    assert init.calls == 1
    other_lr = SubsetFineTuner(init, task_set, _args(tmp_path / "b", learning_rate=0.02), tmp_path,
                               fingerprint="m0")  # fmt: skip
    with pytest.raises(TaeError, match=r"learning_rate: 0.01 -> 0.02.*delete that folder"):
        other_lr.run([[0, 1]], show_progress=False)
    steps = SubsetFineTuner(init, task_set, _args(tmp_path / "c", max_steps=7), tmp_path,
                            fingerprint="m0")  # fmt: skip
    with pytest.raises(TaeError, match=r"max_steps: -1 -> 7"):
        steps.run([[0, 1]], show_progress=False)
    with pytest.raises(TaeError, match=r"fingerprint: m0 -> m1"):
        SubsetFineTuner(init, task_set, _args(tmp_path / "d"), tmp_path, fingerprint="m1").run(
            [[0, 1]], show_progress=False
        )
    neutral = _args(tmp_path / "elsewhere", logging_steps=3, per_device_eval_batch_size=7)
    MultitaskTrainer(model=init(), args=neutral, task_set=task_set)
    assert neutral.label_names  # filled in by the Trainer: not a reason to retrain
    init.calls -= 1
    SubsetFineTuner(init, task_set, neutral, tmp_path, fingerprint="m0").run(
        [[0, 1]], show_progress=False
    )
    assert init.calls == 1  # reused, nothing trained
    (tmp_path / "settings.json").unlink()  # a folder written before settings.json existed
    with pytest.raises(TaeError, match=r"no settings.json"):
        SubsetFineTuner(init, task_set, _args(tmp_path / "e"), tmp_path, fingerprint="m0").run(
            [[0, 1]], show_progress=False
        )


def test_corrupt_middle_line_raises(graph, task_set, tmp_path):
    tuner = SubsetFineTuner(ModelInit(graph), task_set, _args(tmp_path), tmp_path)
    tuner.results_path.write_text(
        '{"bad\n{"subset": [0], "seed": 0, "split": "validation", "rows": []}\n'
    )
    with pytest.raises(TaeError, match="line 1"):
        tuner.load_records()


def test_affinity_from_table_and_seed_average(graph, finished):
    _, _, table = finished
    matrix = AffinityMatrix.from_results(
        table, graph.task_names, metric="log_loss", kind="fine-tuned"
    )
    assert matrix.values.shape == (4, 4) and matrix.counts[1, 1] == 2
    two = pd.concat([table, table.assign(seed=1, f1=table["f1"] + 0.2)], ignore_index=True)
    mean = average_seeds(two)
    assert mean["num_seeds"].tolist() == [2] * len(table)
    np.testing.assert_allclose(mean["f1"], table["f1"] + 0.1)
    np.testing.assert_allclose(mean["log_loss"], table["log_loss"])


def _matrix(values, names=("a", "b", "c", "d")):
    return AffinityMatrix(np.asarray(values, float), list(names), "estimated")


def test_compare_affinities_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    t, t_hat = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    t_hat[0, 3] = np.nan
    out = compare_affinities(_matrix(t_hat), _matrix(t))
    keep = ~np.eye(4, dtype=bool) & np.isfinite(t_hat)
    a, b = t_hat[keep], t[keep]
    assert out["num_entries"] == 11
    assert out["relative_frobenius"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert out["mean_abs_error"] == pytest.approx(np.abs(a - b).mean())
    assert out["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic)
    assert out["pearson"] == pytest.approx(stats.pearsonr(a, b).statistic)
    with_diag = compare_affinities(_matrix(t_hat), _matrix(t), include_diagonal=True)
    assert with_diag["num_entries"] == 15


def test_compare_affinities_rejects_different_tasks():
    with pytest.raises(TaeError, match=r"only in estimated: \['z'\]"):
        compare_affinities(_matrix(np.zeros((4, 4)), "abcz"), _matrix(np.zeros((4, 4))))
    with pytest.raises(TaeError, match="different order"):
        compare_affinities(_matrix(np.zeros((4, 4)), "bacd"), _matrix(np.zeros((4, 4))))


def _noisy_repeats(rng, signal, num, noise):
    names = [f"t{i}" for i in range(len(signal))]
    return [
        AffinityMatrix(signal + noise * rng.normal(size=signal.shape), names, "estimated")
        for _ in range(num)
    ]


def test_self_agreement_against_scipy_and_spearman_brown():
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(6, 6))
    repeats = _noisy_repeats(rng, signal, 3, 1.0)
    out = self_agreement(repeats)
    off = ~np.eye(6, dtype=bool)
    rho = [
        stats.spearmanr(a.values[off], b.values[off]).statistic
        for a, b in [(repeats[0], repeats[1]), (repeats[0], repeats[2]), (repeats[1], repeats[2])]
    ]
    assert out["num_repeats"] == 3
    assert out["mean_spearman"] == pytest.approx(np.mean(rho))
    assert out["min_spearman"] == pytest.approx(min(rho))
    r = np.mean(rho)
    assert out["reliability"] == pytest.approx(3 * r / (1 + 2 * r))
    identical = self_agreement([repeats[0], repeats[0]])
    assert identical["reliability"] == pytest.approx(1.0)
    assert identical["mean_relative_frobenius"] == 0.0
    with pytest.raises(TaeError, match="at least 2 repeats"):
        self_agreement(repeats[:1])


def test_reliability_predicts_agreement_of_two_independent_means():
    """Spearman–Brown: the reliability of an m-repeat mean is the correlation two independent
    m-repeat means reach; the corrected Spearman of two noisy sides of one signal is about 1."""
    rng = np.random.default_rng(2)
    signal = rng.normal(size=(40, 40))
    first, second = _noisy_repeats(rng, signal, 4, 1.5), _noisy_repeats(rng, signal, 4, 1.5)
    observed = compare_affinities(AffinityMatrix.average(first), AffinityMatrix.average(second))
    predicted = self_agreement(first)["reliability"]
    assert observed["spearman"] == pytest.approx(predicted, abs=0.05)
    estimate = AffinityMatrix.average(_noisy_repeats(rng, signal, 3, 2.5))
    truth = AffinityMatrix.average(_noisy_repeats(rng, signal, 2, 1.0))
    rho = compare_affinities(estimate, truth)["spearman"]
    rel_est = self_agreement(_noisy_repeats(rng, signal, 3, 2.5))["reliability"]
    rel_true = self_agreement(_noisy_repeats(rng, signal, 2, 1.0))["reliability"]
    assert rho < 0.75
    assert corrected_spearman(rho, rel_est, rel_true) == pytest.approx(1.0, abs=0.1)
    assert np.isnan(corrected_spearman(rho, 0.0))
    with pytest.raises(TaeError, match="reliability"):
        corrected_spearman(rho)


def test_compare_results_joins_on_subset_and_task(finished):
    _, _, table = finished
    loss = table["log_loss"]
    estimated = table.assign(subset=[s[::-1] for s in table["subset"]], log_loss=loss * 2 + 1)
    two_seeds = pd.concat([table, table.assign(seed=1)], ignore_index=True)
    out = compare_results(estimated, two_seeds, "log_loss")
    assert out["num_pairs"] == len(table)
    assert out["spearman"] == pytest.approx(1.0) and out["pearson"] == pytest.approx(1.0)
    assert out["mean_abs_error"] == pytest.approx((loss + 1).mean())
    with pytest.raises(TaeError, match="only 0"):
        compare_results(estimated.assign(task=9), table, "log_loss")


# ------------------------------------------------------------------ multi-process launch
PARALLEL_SUBSETS = [[0, 1], [1, 2, 3], [0, 2], [3]]
PARALLEL_SCRIPT = """
import json, sys
from accelerate import PartialState
from hf_tae import (MultitaskTrainingArguments, SignConfig, SignForMultiTaskNodeClassification,
                    generate_community_graph)
from hf_tae.evaluation.ground_truth import SubsetFineTuner

out_dir, subsets = sys.argv[1], json.loads(sys.argv[2])
state = PartialState(cpu=True)
world, rank = state.num_processes, state.process_index
graph = generate_community_graph(num_groups=2, tasks_per_group=2, nodes_per_group=80,
                                 background_nodes=40, core_size=30, private_size=10,
                                 num_features=6, seed=1)  # the tiny_graph fixture

def model_init():
    config = SignConfig(in_features=6, num_hops=2, hidden_size=4, task_names=graph.task_names,
                        dropout=0.1, input_dropout=0.1)
    return SignForMultiTaskNodeClassification(config)

args = MultitaskTrainingArguments(output_dir=out_dir + "/unused", learning_rate=1e-2,
                                  num_train_epochs=2, per_device_train_batch_size=64,
                                  per_device_eval_batch_size=4096, lr_scheduler_type="constant",
                                  use_cpu=True, disable_tqdm=True, report_to="none")
tuner = SubsetFineTuner(model_init, graph.task_set(num_hops=2), args, out_dir, seeds=(0,))
table = tuner.run(subsets, show_progress=False)
assert PartialState().num_processes == world  # the launch's state is back after the runs
with open(f"{out_dir}/table.rank{rank}.json", "w") as handle:
    json.dump({"world": world, "table": table.to_dict(orient="list")}, handle)
"""


def _torchrun(script, *argv):
    import os
    import subprocess
    import sys

    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = subprocess.run(
        [*cmd, str(script), *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]


def test_two_processes_share_the_runs_and_match_one_process(graph, task_set, tmp_path):
    """Under torchrun each rank trains its round-robin share alone (no DDP: averaged gradients
    would change the metrics), and every rank returns the merged table of a one-process run."""
    script = tmp_path / "tune.py"
    script.write_text(PARALLEL_SCRIPT)
    out = tmp_path / "two"
    _torchrun(script, str(out), json.dumps(PARALLEL_SUBSETS))

    tables = [json.loads((out / f"table.rank{r}.json").read_text()) for r in (0, 1)]
    assert [t["world"] for t in tables] == [2, 2]
    two = [pd.DataFrame(t["table"]) for t in tables]
    pd.testing.assert_frame_equal(two[0], two[1])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_rank = {r: {tuple(x["subset"]) for x in records if x["rank"] == r} for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert by_rank[0] | by_rank[1] == {tuple(s) for s in PARALLEL_SUBSETS}
    assert not list(out.glob("results.rank*.jsonl")) and not (out / "runs").exists()

    init = ModelInit(graph)
    one = SubsetFineTuner(init, task_set, _args(tmp_path / "u"), tmp_path / "one", seeds=(0,))
    single = one.run(PARALLEL_SUBSETS, show_progress=False)
    assert init.calls == len(PARALLEL_SUBSETS)
    for column in ("subset_id", "subset", "task", "task_name", "num_rows", "seed"):
        assert two[0][column].tolist() == single[column].tolist(), column
    for column in ("f1", "accuracy", "log_loss"):
        np.testing.assert_allclose(two[0][column], single[column], rtol=0, atol=1e-6)


def test_rank_files_of_an_interrupted_launch_are_resumed(graph, task_set, finished, tmp_path):
    """Runs recorded only in a results.rank{r}.jsonl (a launch that died before merging) count
    as finished in a later one-process run, a partial last line there is ignored, and the
    one-process run folds them into results.jsonl."""
    tuner, _, table = finished
    first = json.loads(tuner.results_path.read_text().splitlines()[0])
    (tmp_path / "results.rank1.jsonl").write_text(json.dumps(first) + '\n{"subset": [1, 3], "se')
    (tmp_path / "settings.json").write_text((tuner.output_dir / "settings.json").read_text())
    init = ModelInit(graph)
    again = SubsetFineTuner(init, task_set, tuner.args, tmp_path, seeds=(0,))
    assert [r["subset"] for r in again.load_records()] == [first["subset"]]
    out = again.run([SUBSETS[0], [0, 3]], show_progress=False)
    assert init.calls == 1
    pd.testing.assert_frame_equal(out[out["subset_id"] == 0], table[table["subset_id"] == 0])
    lines = again.results_path.read_text().splitlines()
    assert [json.loads(line)["subset"] for line in lines] == [[0, 1], [0, 3]]
    assert not list(tmp_path.glob("results.rank*.jsonl"))


def test_reliability_of_opposite_members_is_zero():
    """Two members ranked exactly opposite (Spearman −1): Spearman–Brown's denominator is 0; the
    reliability is clipped at 0 instead of dividing by zero."""
    import numpy as np

    from hf_tae.estimation import AffinityMatrix

    values = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=float)
    names = ["a", "b", "c"]
    out = self_agreement([AffinityMatrix(values, names, "estimated"),
                          AffinityMatrix(-values, names, "estimated")])  # fmt: skip
    assert out["mean_spearman"] == pytest.approx(-1.0) and out["reliability"] == 0.0
