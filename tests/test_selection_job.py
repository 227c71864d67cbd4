"""The selection job end to end on a tiny planted image benchmark (few steps, tiny model), its
command-line errors, the best-prefix rule and the representation-similarity baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_tae.selection.select import best_prefix

TINY = [
    "--head", "shared", "--target", "target", "--hidden_sizes", "4", "4", "--embedding_size",
    "4", "--max_steps", "3", "--per_device_train_batch_size", "16", "--eval_strategy", "no",
    "--save_strategy", "no", "--load_best_model_at_end", "false", "--projection_dim", "16",
    "--num_subsets", "20", "--truth_subsets", "3", "--random_baselines", "1",
    "--num_meta_inits", "2",
    "--check_each_source", "false",
    "--first_order_examples", "16", "--disable_tqdm", "true", "--logging_strategy", "no",
    "--report_to", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from hf_tae.selection.planted import ROLES, make_selection_domains

    domains = make_selection_domains(target_train=10)
    assert domains.task_names == list(ROLES)
    counts = domains.split_counts()
    assert counts["train"][0] == 10 and (counts["validation"] > 0).all()
    # keep 12 rows per domain and split: the job's wiring, not its accuracy, is under test
    table = domains.dataset.select_columns(["task", "split"]).to_pandas()
    keep = table.groupby(["task", "split"]).head(12).index.to_numpy()
    domains.dataset = domains.dataset.select(np.sort(keep))
    path = tmp_path_factory.mktemp("planted") / "data"
    domains.save(path)
    return path


def test_best_prefix_keeps_the_best_estimated_top_k():
    table = {(0,): 1.0, (0, 3): 3.0, (0, 1, 3): 2.0}

    def score(subsets):
        return np.array([table.get(tuple(s), 0.0) for s in subsets])

    chosen, scores = best_prefix(score, [3, 1, 2], start=1.5, fixed=[0])
    assert chosen == [3] and scores.tolist() == [1.5, 3.0, 2.0, 0.0]
    chosen, _ = best_prefix(lambda s: np.zeros(len(s)), [3, 1], start=1.0)
    assert chosen == []  # nothing beats the base


def test_recommendation_is_the_best_validated_estimate_based_choice():
    from hf_tae.selection.run import recommend

    def entry(validation, test):
        return {"validation": validation, "test": test, "sources": [f"s{validation}"]}

    by_method = {"ensemble (ours)": entry(0.7, 0.1), "forward pass (GradEx code)": entry(0.8, 0.2),
                 "forward stepwise": entry(0.8, 0.3), "all sources": entry(0.5, 0.9),
                 "gradient similarity": entry(0.99, 0.99), "base only": entry(0.6, 0.5)}  # fmt: skip
    rec = recommend(by_method, "accuracy")  # similarity is not a candidate; a tie: the first
    assert (rec["method"], rec["test"]) == ("forward pass (GradEx code)", 0.2)
    assert "gradient similarity" not in rec["candidates"]
    assert recommend(by_method, "log_loss")["method"] == "all sources"  # lower is better


def test_selection_job_writes_report_results_and_plots(planted, tmp_path, capfd):
    from hf_tae.selection.cli import main

    out = tmp_path / "run"
    capfd.readouterr()
    assert main(["images", "--dataset", str(planted), "--output_dir", str(out), *TINY]) == 0
    err = capfd.readouterr().err  # --disable_tqdm true: no progress bar from any stage
    assert "fitting subsets" not in err and "it/s]" not in err and "examples/s]" not in err
    results = json.loads((out / "results.json").read_text())
    for name in ("report.md", "source_scores.png", "forward_selection.png",
                 "estimated_vs_real.png", "sources.json"):  # fmt: skip
        assert (out / name).is_file(), name
    methods = results["methods"]
    assert {"ensemble (ours)", "forward pass (GradEx code)", "forward stepwise", "all sources",
            "gradient similarity", "representation similarity", "base only"} <= set(methods)  # fmt: skip
    assert len(methods["all sources"]) == 7 and "target" not in methods["all sources"]
    training = results["training"]
    assert set(training["by_method"]) == set(methods)
    assert training["estimated_vs_real"]["num_subsets"] >= 5
    assert training["source_effects"] == {}
    assert "first_order_error" in results["first_order"]
    assert len(results["ensemble"]) == 7 and all(r["count"] > 0 for r in results["ensemble"])
    # --estimator_l2 vote (default): each λ of the grid chose, the kept sources are the majority
    by_l2 = results["estimation"]["by_l2"]
    assert [float(x) for x in by_l2] == [1.0, 10.0]  # the weak ridges (SELECTION_L2_GRID)
    for method in ("ensemble (ours)", "forward stepwise"):
        votes = [s for c in by_l2.values() for s in c[method]]
        assert sorted(methods[method]) == sorted({s for s in votes if votes.count(s) == 2})
    assert "## Choices by λ" in (out / "report.md").read_text()
    # --num_meta_inits 2: a second θ0 (seed + 1) under ensemble/, each θ0's own choice trained
    assert (out / "ensemble" / "member_1" / "meta_init").is_dir()
    assert [m["seed"] for m in results["by_meta_init"]] == [42, 43]
    assert [r["sources"] for r in training["by_meta_init"]] == [
        m["ensemble (ours)"] for m in results["by_meta_init"]]  # fmt: skip
    assert "## Choices by meta-initialization" in (out / "report.md").read_text()
    # the recommendation: the trained candidate with the best validation accuracy
    rec = training["recommended"]
    best = max(training["by_method"][m]["validation"] for m in rec["candidates"])
    assert training["by_method"][rec["method"]]["validation"] == best
    assert "**Recommended:" in (out / "report.md").read_text()
    # resumable: a rerun trains nothing new
    runs = (out / "training" / "results.jsonl").read_text()
    assert main(["images", "--dataset", str(planted), "--output_dir", str(out), *TINY]) == 0
    assert (out / "training" / "results.jsonl").read_text() == runs


def test_selection_command_rejects_bad_input(planted, tmp_path, capsys):
    from hf_tae.selection.cli import main

    base = ["images", "--dataset", str(planted), "--output_dir", str(tmp_path / "bad")]
    assert main([*base, "--target", "nope"]) == 2
    assert "not a task" in capsys.readouterr().err
    assert main([*base, "--target", "target", "--sources", "column"]) == 2
    assert "--source_column" in capsys.readouterr().err
    assert main([*base, "--target", "target", "--step_norm", "nan", *TINY[4:]]) == 2
    assert "step size" in capsys.readouterr().err
    assert main([*base, "--target", "target", "--estimator_l2", "auto"]) == 2
    assert "'vote'" in capsys.readouterr().err
    assert main([*base, "--target", "target", "--estimator_l2_grid", "10", "0"]) == 2
    assert "--estimator_l2_grid" in capsys.readouterr().err
    assert main([*base, "--target", "target", "--num_meta_inits", "0"]) == 2
    assert "--num_meta_inits must be >= 1" in capsys.readouterr().err


def test_representation_similarity_against_a_hand_computation():
    import torch
    from datasets import Dataset

    from hf_tae.selection.check import representation_similarity
    from hf_tae.tasks.taskset import TaskSet

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    ds = Dataset.from_dict({"x": x.tolist(), "labels": [0, 1] * 6, "task": [0] * 12,
                            "split": ["train"] * 8 + ["validation"] * 4})  # fmt: skip
    tasks = TaskSet(ds, task_names=["t"], input_columns=["x"])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(3, 5)
            self.classifier = torch.nn.Linear(5, 2)

        def forward(self, x, task=None):
            return self.classifier(torch.tanh(self.body(x)))

    model = Model()
    example_ids, sources, target = (
        np.arange(8),
        np.array([0, 0, 1, 1, 1, 2, 2, 2]),
        np.arange(8, 12),
    )
    sims = representation_similarity(model, tasks, "classifier", example_ids, sources, 4, target)
    with torch.no_grad():
        h = torch.tanh(model.body(torch.as_tensor(x))).double().numpy()
    t = h[8:].mean(0)
    for s in range(3):
        m = h[:8][sources == s].mean(0)
        assert sims[s] == pytest.approx(m @ t / np.linalg.norm(m) / np.linalg.norm(t))
    assert np.isnan(sims[3])


def test_selection_job_under_torchrun_splits_the_real_runs(planted, tmp_path):
    """Two processes (torchrun, CPU): θ0s train under DDP, and the real check's runs are shared
    out, each recorded with the rank that trained it; one results.json."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("hf-tae")
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(cli), "select", "images", "--dataset", str(planted), "--output_dir", str(out),
           *TINY]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "training" / "results.jsonl").open()]
    assert {r["rank"] for r in records} == {0, 1}
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["recommended"]["method"] in results["methods"]
