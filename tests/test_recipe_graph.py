"""recipes/graph_communities.py (= ``hf-tae run graph``) end to end: plain python, the CLI, and
accelerate launch with 2 CPU processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "graph_communities.py"
SMALL = [
    "--num_groups",
    "2",
    "--tasks_per_group",
    "2",
    "--num_train_epochs",
    "10",
    "--disable_tqdm",
    "true",
    "--subset_size",
    "2",
    "--num_task_groups",
    "2",
    "--num_meta_inits",
    "2",
]


def _env():
    env = dict(
        os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_recipe_trains_saves_and_reloads(tmp_path):
    import torch
    from transformers import AutoModel

    from hf_tae import CommunityGraph

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(RECIPE), "--output_dir", str(out), *SMALL],
                          env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 1 and len(results["tasks"]) == 4
    assert set(results["meta_init"]["baseline_per_task"]) == set(results["tasks"])
    assert (out / "test_f1_per_task.png").stat().st_size > 1000
    from hf_tae import GradientStore

    store = GradientStore.load(out / "gradients")
    assert store.dim == 200 and len(store) == results["gradients"]["rows"] > 0
    # the saved meta-initialization and graph reproduce the reported test metrics
    graph = CommunityGraph.load(out / "data")
    model = AutoModel.from_pretrained(out / "meta_init").eval()
    task_set = graph.task_set(model.config.num_hops)
    test = task_set.trainer_dataset("test")
    with torch.no_grad():
        logits = model(test["hop_features"][:]).logits.numpy()
    from hf_tae import MultiLabelTaskMetrics

    scores = MultiLabelTaskMetrics(graph.task_names).per_task(
        logits, test["labels"][:].numpy(), test["label_mask"][:].numpy()
    )
    for name, values in scores.items():
        assert values["f1"] == pytest.approx(
            results["meta_init"]["test"][f"test_{name}_f1"], abs=1e-6
        )

    # --meta_init starts from the saved meta-initialization without training: same test metrics
    again = tmp_path / "again"
    cmd = [sys.executable, str(RECIPE), "--output_dir", str(again), *SMALL,
           "--meta_init", str(out / "meta_init"), "--estimate", "false",
           "--collect_gradients", "false"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = json.loads((again / "results.json").read_text())
    assert rerun["meta_init"]["test_avg"] == pytest.approx(
        results["meta_init"]["test_avg"], abs=1e-6
    )


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate CLI not installed")  # fmt: skip
def test_recipe_under_accelerate_launch_uses_two_processes(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    out = tmp_path / "run"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(RECIPE), "--output_dir", str(out), *SMALL]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert (out / "meta_init" / "model.safetensors").exists()


def test_plain_torchrun_on_cpu_without_accelerate_use_cpu_is_refused(tmp_path):
    """Two processes and no CUDA, but no ACCELERATE_USE_CPU: each rank would run the whole job
    alone (TrainingArguments reset the launch), so both refuse before any work, naming the fix."""
    env = _env()
    env.pop("ACCELERATE_USE_CPU")
    env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA device, as on this machine
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(RECIPE), "--output_dir", str(out), *SMALL]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.count("2-process launch (WORLD_SIZE=2)") == 2, proc.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=1 torchrun" in proc.stderr
    assert not out.exists()


def test_full_pipeline_report_groups_and_ground_truth(tmp_path):
    """Every stage runs through ``hf-tae run``; its outputs agree with independent recomputation."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    from hf_tae import AffinityMatrix, CommunityGraph

    out = tmp_path / "run"
    cli = Path(sys.executable).with_name("hf-tae")
    # --num_task_groups 0 (after SMALL's 2): k chosen by the sweep over k = 1 … 4
    # --estimator_l2 auto: λ from the default grid by the members' agreement
    # --affinity_kind higher-order: the subsets' affinity is the clustered one (the default,
    # fisher, is checked against its reference in test_gradient_affinity.py)
    cmd = [str(cli), "run", "--output_dir", str(out), *SMALL, "--ground_truth", "3",
           "--num_task_groups", "0", "--estimator_l2", "auto",
           "--affinity_kind", "higher-order"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    graph = CommunityGraph.load(out / "data")
    tasks = graph.task_names

    # stage timings for every stage that ran
    assert set(results["timings"]) >= {
        "data", "meta-initialization", "gradients", "estimation + affinity", "grouping",
        "group training", "ground truth",
    }  # fmt: skip
    # estimation: all C(4, 2) = 6 pairs on each of 2 meta-initializations, saved with the matrix,
    # which is the mean of the two members' matrices (each z-scored on its own)
    affinity = AffinityMatrix.load(out / "affinity")
    assert results["estimation"]["num_subsets"] == 6 and len(affinity.results) == 24
    assert len(results["ensemble"]) == 1 and (out / "ensemble" / "member_1" / "gradients").is_dir()
    members = [
        AffinityMatrix.from_results(rows, tasks, metric="log_loss", symmetrize=True).to_numpy()
        for _, rows in affinity.results.groupby("member")
    ]
    np.testing.assert_allclose(affinity.to_numpy(), np.mean(members, axis=0), atol=1e-12)
    # the members' agreement (scipy over the off-diagonal entries) and its Spearman–Brown
    # reliability for the mean of two
    off = ~np.eye(len(tasks), dtype=bool)
    rho = stats.spearmanr(members[0][off], members[1][off]).statistic
    agreement = results["estimation"]["self_agreement"]
    # λ: the grid value whose members agree best, and the saved affinity was built at it
    selection = results["estimation"]["l2_selection"]
    assert [r["l2"] for r in selection] == [1.0, 10.0, 100.0, 1000.0, 10000.0]
    best = max(selection, key=lambda r: r["agreement"])
    assert results["estimation"]["estimator_l2"] == best["l2"] and best["chosen"]
    assert agreement["mean_spearman"] == pytest.approx(best["agreement"])
    assert affinity.provenance["estimator_l2"] == best["l2"]
    assert agreement["mean_spearman"] == pytest.approx(rho)
    assert agreement["reliability"] == pytest.approx(max(2 * rho / (1 + rho), 0))
    # the groups: a partition of the tasks into k = 2, whose reported objective is the average
    # within-group density Σ_c 1ᵀT_c1/|c| of the saved matrix (computed here by hand)
    grouping = json.loads((out / "groups.json").read_text())
    assert sorted(t for g in grouping["groups"] for t in g) == sorted(tasks)
    sweep = {row["k"]: row for row in grouping["sweep"]}
    assert sorted(sweep) == [1, 2, 3, 4]
    assert grouping["k"] == len(grouping["groups"])
    # the partition (--partition_choice silhouette, the default): the sweep's grouping with the
    # best mean silhouette under D = max W − W (scikit-learn's silhouette_score), scored by
    # predicted payoff against all tasks and single tasks; exactly one candidate is chosen, it
    # is tied with the best (within one paired SE of the best mean payoff, log-loss: lower is
    # better) and it is the partition that was trained (when the rule picks all tasks or single
    # tasks, --propose_groups trains the grouping instead, and says so)
    from sklearn.metrics import silhouette_score

    W = np.nan_to_num(affinity.to_numpy())
    W = (W + W.T) / 2
    D = np.where(off, W[off].max() - W, 0.0)
    silhouettes = {k: silhouette_score(D, row["labels"], metric="precomputed")
                   for k, row in sweep.items() if 1 < len(set(row["labels"])) < len(tasks)}  # fmt: skip
    best_k = max(silhouettes, key=silhouettes.get)
    for k, value in silhouettes.items():
        assert sweep[k]["silhouette"] == pytest.approx(value, abs=1e-9)  # JSON: 10 digits
    # the same groupings on each member's own matrix: its silhouettes, and how many members
    # score each k best (smallest k on ties)
    member_best = []
    for m, M in enumerate(members):
        Wm = (M + M.T) / 2
        Dm = np.where(off, Wm[off].max() - Wm, 0.0)
        own = {k: silhouette_score(Dm, sweep[k]["labels"], metric="precomputed")
               for k in silhouettes}  # fmt: skip
        for k, value in own.items():
            assert sweep[k]["silhouette_members"][m] == pytest.approx(value, abs=1e-9)
        member_best.append(max(sorted(own), key=own.get))
    for k in sweep:
        assert sweep[k]["preferred_by_members"] == member_best.count(k)
    # a saved run's members are rebuilt from its per-(subset, task) estimates (benchmarks)
    from hf_tae.pipeline.arguments import EstimationArguments
    from hf_tae.pipeline.stages import member_affinities

    rebuilt = member_affinities(affinity, [], EstimationArguments(affinity_metric="log_loss"))
    for M, R in zip(members, rebuilt, strict=True):
        np.testing.assert_allclose(np.nan_to_num(R.to_numpy()), np.nan_to_num(M), atol=1e-12)
    # --split_incoherent_groups (default): a group of the best-k grouping whose tasks' mean
    # silhouette (scikit-learn's silhouette_samples on each member's own distance, averaged
    # over the members) is <= 0 becomes single tasks
    from sklearn.metrics import silhouette_samples

    labels = np.asarray(sweep[best_k]["labels"])
    per_task = np.mean([silhouette_samples(np.where(off, (M + M.T)[off].max() / 2 - (M + M.T) / 2,
                                                    0.0), labels, metric="precomputed")
                        for M in members], axis=0)  # fmt: skip
    incoherent = [g for g in set(labels.tolist())
                  if (labels == g).sum() > 1 and per_task[labels == g].mean() <= 0]  # fmt: skip
    kept = [i for i in range(len(tasks)) if labels[i] not in incoherent]
    expected_groups = {frozenset(tasks[i] for i in kept if labels[i] == g) for g in labels[kept]}
    expected_groups |= {frozenset([t]) for t, g in zip(tasks, labels, strict=True)
                        if g in incoherent}  # fmt: skip
    assert [g["tasks"] for g in grouping["coherence"]["split"]] == [
        [t for t, g in zip(tasks, labels, strict=True) if g == h] for h in
        dict.fromkeys(labels.tolist()) if h in incoherent]  # fmt: skip
    name = f"SDP k={best_k}" + (f", split to k={len(expected_groups)}" if incoherent else "")
    candidates = grouping["candidates"]
    assert [c["candidate"] for c in candidates] == (
        ["all tasks (k=1)", name, "single tasks (k=n)"] if len(expected_groups) < len(tasks)
        else ["all tasks (k=1)", "single tasks (k=n)"])  # fmt: skip
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["num_groups"] == grouping["k"]
    trivial = ("all tasks (k=1)", "single tasks (k=n)")
    split_text = ("; split into single tasks (not cohesive on the meta-initializations): "
                  if incoherent else "")  # fmt: skip
    prefix = (f"best silhouette k={best_k} ({silhouettes[best_k]:.2f}, the best on "
              f"{member_best.count(best_k)} of 2 meta-initializations){split_text}")
    assert grouping["k_choice"].startswith(prefix) and "; predicted payoff: " in grouping["k_choice"]
    if chosen[0]["candidate"] == name:
        assert {frozenset(g) for g in grouping["groups"]} == expected_groups
    if "trained instead" in grouping["k_choice"]:
        assert chosen[0]["candidate"] == name
        assert grouping["k_choice"].split("; predicted payoff: ")[1].startswith(trivial)
    else:
        best = min(c["payoff"] for c in candidates)
        assert chosen[0]["payoff"] - best <= chosen[0]["vs_best_se"] + 1e-12
        assert grouping["k_choice"].endswith("; predicted payoff: " + chosen[0]["candidate"])
    assert {c["candidate"] for c in candidates} >= {"all tasks (k=1)", "single tasks (k=n)"}
    T = np.nan_to_num(affinity.to_numpy())
    ids = [[tasks.index(t) for t in g] for g in grouping["groups"]]
    density = sum(T[np.ix_(g, g)].sum() / len(g) for g in ids)
    assert grouping["objective"] == pytest.approx(density, rel=1e-6)
    # group training: every strategy scores every task; averages are the per-task means
    training = results["group_training"]
    validated = training["validated_groups"]
    assert set(training["summary"]) == {"grouped", "all tasks", "single task", "planted groups",
                                        *(["validated groups"] if validated else [])}  # fmt: skip
    for name, summary in training["summary"].items():
        per_task = [training["per_task"][t][name] for t in tasks]
        assert summary["f1"] == pytest.approx(np.mean(per_task), abs=1e-9)
    assert training["summary"]["single task"]["num_models"] == 4
    # shared runs: single-task and 2-task groups are trained once each, however many
    # strategies use them (4 singles + 1 all-tasks + at most 4 distinct pairs)
    runs = [
        json.loads(x) for x in (out / "group_training" / "results.jsonl").read_text().splitlines()
    ]
    assert len(runs) <= 2 * 9 and {r["split"] for r in runs} == {"test", "validation"}
    # the recommendation: the best validation F1 (mean over tasks of each task's score under
    # its group's model, seeds averaged) among grouped / all tasks / single task
    val = {}
    for r in runs:
        if r["split"] == "validation":
            for row in r["rows"]:
                val.setdefault((tuple(r["subset"]), row["task_name"]), {})[r["seed"]] = row["f1"]
    index = {t: i for i, t in enumerate(tasks)}

    def val_mean(group, t, seed=None):
        scores = val[(tuple(sorted(index[x] for x in group)), t)]
        return np.mean(list(scores.values())) if seed is None else scores[seed]

    # the validated groups: every group whose tasks' mean validation F1 is higher alone than
    # together with every seed is split into single tasks (None when none is)
    expected_validated = []
    for g in grouping["groups"]:
        alone_wins = all(np.mean([val_mean([t], t, s) for t in g])
                         > np.mean([val_mean(g, t, s) for t in g]) for s in (0, 1))  # fmt: skip
        expected_validated += [[t] for t in g] if len(g) > 1 and alone_wins else [list(g)]
    if len(expected_validated) in (len(grouping["groups"]), len(tasks)):  # none split, or all
        expected_validated = None
    assert validated == expected_validated
    partitions = {"grouped": grouping["groups"], "all tasks": [tasks],
                  "single task": [[t] for t in tasks]}  # fmt: skip
    if validated:
        partitions["validated groups"] = validated
    expected = {name: np.mean([val_mean(g, t) for g in groups for t in g])
                for name, groups in partitions.items()}  # fmt: skip
    rec = training["recommended"]
    assert rec["validation"] == pytest.approx(expected, abs=1e-9)
    assert rec["strategy"] == max(expected, key=expected.get)
    assert rec["test"] == pytest.approx(training["summary"][rec["strategy"]]["f1"])
    assert sorted(t for g in rec["groups"] for t in g) == sorted(tasks)
    # ground truth: 3 fine-tuned subsets compared with their estimates
    truth = results["ground_truth"]
    assert truth["num_subsets"] == 3 and truth["scores"]["num_pairs"] == 6
    assert truth["runs"] == truth["runs_trained"] == 6  # 3 subsets × 2 seeds, all trained now
    # two seeds by default: the truth's own agreement, the estimate's, and the Spearman
    # corrected for both (when both reliabilities are positive)
    table = pd.read_json(out / "ground_truth" / "results.jsonl", lines=True)
    assert sorted(table["seed"].unique()) == [0, 1] and len(table) == 6  # (subset, seed) lines
    t_rel = truth["truth_self_agreement"]["reliability"]
    e_rel = truth["estimate_self_agreement"]["reliability"]
    if t_rel > 0 and e_rel > 0:
        assert truth["corrected_spearman"] == pytest.approx(
            truth["affinity"]["spearman"] / np.sqrt(t_rel * e_rel)
        )
    # the truth clustered itself at the job's k and the planted k (those between 1 and n):
    # partitions of the tasks, their ARIs those of their groups against both labellings
    from sklearn.metrics import adjusted_rand_score

    chosen, planted = results["grouping"]["labels"], results["planted_labels"]
    ks = {len(set(chosen)), len(set(planted))} - {1, len(tasks)}
    assert sorted(row["k"] for row in truth["truth_groups"]) == sorted(ks)
    for row in truth["truth_groups"]:
        assert len(row["groups"]) == row["k"]
        assert sorted(t for g in row["groups"] for t in g) == sorted(tasks)
        found = [next(i for i, g in enumerate(row["groups"]) if t in g) for t in tasks]
        assert row["ari_vs_chosen"] == pytest.approx(adjusted_rand_score(chosen, found))
        assert row["ari_vs_planted"] == pytest.approx(adjusted_rand_score(planted, found))
    for name in (
        "report.md",
        "affinity_by_group.png",
        "grouping_gains.png",
        "estimated_vs_true.png",
    ):
        assert (out / name).stat().st_size > 500, name
    report = (out / "report.md").read_text()
    for heading in (
        "## Timings",
        "## Task groups",
        "## Group training",
        "## Estimated vs fine-tuned",
    ):
        assert heading in report
    assert "Both sides are noisy: 2 fine-tuning seeds agree" in report
    assert (
        "`--estimator_l2 auto`" in report and "Candidate partitions by predicted payoff" in report
    )
    assert f"**Recommended: {rec['strategy']}**" in report
    assert "| silhouette per meta-initialization | best on |" in report
    assert grouping["silhouette_k_votes"] == {
        "k": best_k, "best_on": member_best.count(best_k), "meta_inits": 2}  # fmt: skip
    assert f"(k = {best_k}) is the best on {member_best.count(best_k)} of 2" in report

    # a rerun reuses the finished meta-initializations and comparison runs: same answers
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["meta_init"]["reused"] and not results["meta_init"]["reused"]
    assert again["meta_init"]["test_avg"] == pytest.approx(results["meta_init"]["test_avg"])
    assert again["grouping"]["groups"] == results["grouping"]["groups"]
    assert again["group_training"]["summary"] == results["group_training"]["summary"]


def test_meta_init_fingerprint_changes_with_what_changes_the_weights(tiny_graph, tmp_path):
    from hf_tae import MultitaskTrainingArguments
    from hf_tae.families.graph.family import GraphArguments, GraphFamily
    from hf_tae.pipeline.stages import meta_init_fingerprint

    def fingerprint(graph=tiny_graph, family_args=None, **training):
        args = MultitaskTrainingArguments(output_dir=str(tmp_path / "a"), **training)
        family_args = family_args or GraphArguments()
        return meta_init_fingerprint(GraphFamily(), family_args, graph.task_set(3), args)

    base = fingerprint()
    assert fingerprint(disable_tqdm=True) == base  # does not change the weights
    assert fingerprint(learning_rate=0.5) != base
    assert fingerprint(seed=7) != base
    other = type(tiny_graph)(**{**tiny_graph.__dict__, "x": tiny_graph.x + 1})
    assert fingerprint(graph=other) != base
    assert fingerprint(family_args=GraphArguments(hidden_size=16)) != base
    # where the same graph was read from does not change the weights: a moved run resumes
    assert fingerprint(family_args=GraphArguments(dataset=str(tmp_path / "copy"))) == base


def test_cli_run_rejects_bad_options_before_training(tmp_path):
    cli = Path(sys.executable).with_name("hf-tae")
    for flag, value, message in (
        ("--clustering", "louvain", "--clustering 'louvain' is not one of"),
        ("--subset_size", "1", "--subset_size must be >= 2"),
        ("--estimator_l2", "big", "--estimator_l2 'big' is neither a number nor 'auto'"),
        ("--estimator_l2", "-1", "--estimator_l2 must be a number > 0 or 'auto'"),
        ("--run_steps", "0", "--run_steps must be >= 1"),
        ("--meta_init_widenings", "-1", "--meta_init_widenings must be >= 0"),
        ("--early_meta_init_fraction", "0", "--early_meta_init_fraction must be in (0, 1]"),
        ("--early_meta_init_fraction", "1.5", "--early_meta_init_fraction must be in (0, 1]"),
        ("--generation_metrics", "true", "needs a family whose trainer generates text"),
    ):
        cmd = [str(cli), "run", "--output_dir", str(tmp_path / "x"), flag, value]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "x" / "meta_init").exists()


def test_generator_settings_are_flags_of_the_graph_job():
    """``hf-tae run graph --core_keep 0.8 --private_size 25`` builds the generator's graph with
    those settings; every generator flag defaults to the generator's own default."""
    import inspect

    import numpy as np

    from hf_tae import generate_community_graph
    from hf_tae.families.graph.family import GraphArguments, GraphFamily
    from hf_tae.pipeline.run import build_parser

    flags = ("nodes_per_group", "background_nodes", "core_size", "core_keep", "private_size",
             "p_community", "p_region", "signature_strength", "community_strength",
             "node_features")  # fmt: skip
    defaults = inspect.signature(generate_community_graph).parameters
    for name in flags:
        assert getattr(GraphArguments(), name) == defaults[name].default, name
        assert build_parser("graph").get_default(name) == defaults[name].default, name

    parser = build_parser("graph")
    args = parser.parse_args_and_config(["--core_keep", "0.8", "--private_size", "25",
                                         "--output_dir", "unused"])[0]  # fmt: skip
    assert (args.core_keep, args.private_size) == (0.8, 25)
    graph = GraphFamily().load_tasks(args).source
    expected = generate_community_graph(core_keep=0.8, private_size=25, seed=0)
    assert np.array_equal(graph.labels, expected.labels)
    assert np.array_equal(graph.x, expected.x) and np.array_equal(graph.split, expected.split)
    default = generate_community_graph(seed=0)
    assert not np.array_equal(graph.labels, default.labels)
    assert graph.labels.sum(0).tolist() != default.labels.sum(0).tolist()  # 25 private members

    # the other flags reach the generator too (here: smaller regions, spectral features)
    small = ["--nodes_per_group", "50", "--background_nodes", "20", "--core_size", "15",
             "--p_community", "0.3", "--p_region", "0.05", "--signature_strength", "1.0",
             "--community_strength", "0.5", "--node_features", "spectral", "--num_groups", "2",
             "--data_seed_graph", "3", "--output_dir", "unused"]  # fmt: skip
    args = parser.parse_args_and_config(small)[0]
    graph = GraphFamily().load_tasks(args).source
    expected = generate_community_graph(
        2, 4, nodes_per_group=50, background_nodes=20, core_size=15, p_community=0.3,
        p_region=0.05, signature_strength=1.0, community_strength=0.5,
        node_features="spectral", seed=3,
    )  # fmt: skip
    for field in ("x", "edge_index", "labels", "split"):
        assert np.array_equal(getattr(graph, field), getattr(expected, field)), field
    assert graph.info["params"] == expected.info["params"]


def test_meta_init_below_the_label_frequency_baseline_is_flagged(tiny_graph, tmp_path):
    """A θ0 that scores no better than predicting label frequencies learned no task: the stage
    says so (its gradients carry no task structure) instead of estimating in silence."""
    from hf_tae import MultitaskTrainingArguments
    from hf_tae.families.graph.family import GraphArguments, GraphFamily
    from hf_tae.pipeline.arguments import PipelineArguments
    from hf_tae.pipeline.stages import train_meta_init

    class Baseline(GraphFamily):
        level = -1.0  # below any F1

        def baseline(self, tasks, split="test"):
            return {name: self.level for name in tasks.task_names}

    family, tasks = Baseline(), tiny_graph.task_set(3)
    args = MultitaskTrainingArguments(output_dir=str(tmp_path), num_train_epochs=1,
                                      disable_tqdm=True, report_to=[])  # fmt: skip
    _, info = train_meta_init(family, GraphArguments(), tasks, PipelineArguments(), args,
                              tmp_path, save_data=False)  # fmt: skip
    assert info["below_baseline"] is None
    family.level = 1.0  # an F1 no model reaches
    _, info = train_meta_init(family, GraphArguments(), tasks, PipelineArguments(), args,
                              tmp_path, save_data=False)  # fmt: skip
    assert f"test f1 {info['test_avg']:.3f}" in info["below_baseline"]
    assert "label-frequency baseline's 1.000" in info["below_baseline"]
    assert "(--hidden_size or --num_mlp_layers)" in info["below_baseline"]  # how to widen it


def test_a_meta_init_that_learns_nothing_is_retrained_wider(tiny_graph, tmp_path):
    """--meta_init_widenings: θ0 below the label-frequency baseline is retrained with
    --hidden_size doubled until one learns (at most the given number of times); the saved θ0
    is the wide one, and a resumed job goes straight to it without training the narrow one."""
    import json

    from hf_tae import MultitaskTrainingArguments
    from hf_tae.families.graph.family import GraphArguments, GraphFamily
    from hf_tae.pipeline.arguments import PipelineArguments
    from hf_tae.pipeline.stages import WIDENING_FILE, train_meta_init_that_learns

    class LearnsFrom(GraphFamily):
        """Pretends θ0 learns only from width ``needed`` on: an unreachable baseline (F1 1.0)
        below it, an F1 of -1 from it on; counts the models built (trainings)."""

        def __init__(self, needed):
            self.needed, self.width, self.built = needed, None, []

        def model_init(self, args, tasks):
            self.width = args.hidden_size
            self.built.append(args.hidden_size)
            return super().model_init(args, tasks)

        def baseline(self, tasks, split="test"):
            learned = self.width is None or self.width >= self.needed
            return {name: -1.0 if learned else 1.0 for name in tasks.task_names}

    tasks = tiny_graph.task_set(3)
    args = MultitaskTrainingArguments(output_dir=str(tmp_path), num_train_epochs=1,
                                      disable_tqdm=True, report_to=[])  # fmt: skip
    family = LearnsFrom(needed=16)
    _, info, kept = train_meta_init_that_learns(family, GraphArguments(hidden_size=4), tasks,
                                                PipelineArguments(), args, tmp_path)  # fmt: skip
    assert family.built == [4, 8, 16] and kept.hidden_size == 16
    assert info["below_baseline"] is None
    assert [t["capacity"] for t in info["widening"]["tried"]] == [
        {"--hidden_size": 4, "--num_mlp_layers": 2}, {"--hidden_size": 8, "--num_mlp_layers": 2}]  # fmt: skip
    assert all(0 <= t["test_avg"] <= 1 for t in info["widening"]["tried"])
    assert info["widening"]["kept"]["capacity"]["--hidden_size"] == 16
    saved = json.loads((tmp_path / "meta_init" / "config.json").read_text())
    assert saved["hidden_size"] == 16
    # resumed: straight to width 16, reused from disk, nothing trained
    again = LearnsFrom(needed=16)
    _, info, kept = train_meta_init_that_learns(again, GraphArguments(hidden_size=4), tasks,
                                                PipelineArguments(), args, tmp_path)  # fmt: skip
    assert again.built == [] and info["reused"] and kept.hidden_size == 16
    assert [t["capacity"]["--hidden_size"] for t in info["widening"]["tried"]] == [4, 8]
    # a resume with a lower limit keeps to it: width 8, the one widening it allows
    lower = LearnsFrom(needed=16)
    _, info, kept = train_meta_init_that_learns(lower, GraphArguments(hidden_size=4), tasks,
                                                PipelineArguments(meta_init_widenings=1), args,
                                                tmp_path)  # fmt: skip
    assert kept.hidden_size == 8 and lower.built == [8] and info["below_baseline"]
    # the limit: never more than --meta_init_widenings retrainings; 0 keeps the user's model
    capped = LearnsFrom(needed=1024)
    _, info, kept = train_meta_init_that_learns(
        capped, GraphArguments(hidden_size=4), tasks,
        PipelineArguments(meta_init_widenings=1, reuse_meta_init=False), args, tmp_path / "c")  # fmt: skip
    assert capped.built == [4, 8] and kept.hidden_size == 8 and info["below_baseline"]
    off = LearnsFrom(needed=1024)
    _, info, kept = train_meta_init_that_learns(
        off, GraphArguments(hidden_size=4), tasks, PipelineArguments(meta_init_widenings=0),
        args, tmp_path / "off")  # fmt: skip
    assert off.built == [4] and kept.hidden_size == 4 and info["widening"] is None
    assert not (tmp_path / "off" / WIDENING_FILE).exists()


def test_early_training_args_take_a_fraction_of_the_epochs_or_the_steps():
    """--early_meta_init_fraction: epochs scale as given; max_steps, when set, wins and rounds
    to at least one step; the arguments passed in are left alone."""
    from hf_tae import MultitaskTrainingArguments
    from hf_tae.pipeline.stages import early_training_args

    by_epochs = MultitaskTrainingArguments(output_dir="unused", num_train_epochs=60, report_to=[])
    assert early_training_args(by_epochs, 0.5).num_train_epochs == 30
    assert by_epochs.num_train_epochs == 60
    by_steps = MultitaskTrainingArguments(output_dir="unused", max_steps=7, report_to=[])
    assert early_training_args(by_steps, 0.5).max_steps == 4  # round(3.5)
    assert early_training_args(by_steps, 0.01).max_steps == 1
    assert by_steps.max_steps == 7


def test_subsets_are_estimated_at_the_early_meta_init_and_overlaps_at_the_trained_one(
        tiny_graph, tmp_path, caplog):  # fmt: skip
    """The early θ0 is θ0 trained for half the epochs (the same weights as a θ0 trained that
    long on its own); the subsets' regression fits on its gradients (against a direct
    RegressionEstimator) while the clustered NTK overlap is the trained θ0's (against
    gradient_affinity); an early θ0 no better than the baseline is not used, and its warning
    says what happens instead."""
    import logging

    import numpy as np
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    from hf_tae import MultitaskTrainingArguments, RegressionEstimator
    from hf_tae.estimation.gradient_affinity import gradient_affinity
    from hf_tae.families.graph.family import GraphArguments, GraphFamily
    from hf_tae.pipeline.arguments import EstimationArguments, GradientArguments, PipelineArguments
    from hf_tae.pipeline.stages import (
        collect_member_gradients,
        early_meta_init_store,
        estimate_affinity,
        train_meta_init,
    )

    class Baseline(GraphFamily):
        level = -1.0  # every θ0 beats it

        def baseline(self, tasks, split="test"):
            return {name: self.level for name in tasks.task_names}

    family, tasks, model_args = Baseline(), tiny_graph.task_set(3), GraphArguments()
    grad_args = GradientArguments(projection_dim=16)
    pipeline = PipelineArguments(early_meta_init_fraction=0.5)

    def training(epochs):
        return MultitaskTrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs,
                                          disable_tqdm=True, report_to=[])  # fmt: skip

    trainer, _ = train_meta_init(family, model_args, tasks, pipeline, training(4),
                                 tmp_path / "run", save_data=False)  # fmt: skip
    trained, _ = collect_member_gradients(trainer, family, model_args, grad_args,
                                          tmp_path / "run", 0)  # fmt: skip
    early, info = early_meta_init_store(family, model_args, tasks, pipeline, grad_args,
                                        training(4), tmp_path / "run", 0)  # fmt: skip
    assert info["used"] and info["fraction"] == 0.5 and early.path == tmp_path / "run/early/gradients"
    reference, _ = train_meta_init(family, model_args, tasks, pipeline, training(2),
                                   tmp_path / "two_epochs", save_data=False)  # fmt: skip
    got = load_file(tmp_path / "run/early/meta_init/model.safetensors")
    want = reference.model.state_dict()
    full = trainer.model.state_dict()
    assert all(torch.equal(got[k], want[k].cpu()) for k in got)
    assert any(not torch.equal(got[k], full[k].cpu()) for k in got)

    est = EstimationArguments(num_subsets=6, subset_size=2, num_meta_inits=1,
                              estimator_l2="10", affinity_kind="ntk", affinity_metric="log_loss")  # fmt: skip
    subsets, affinity, _, _ = estimate_affinity([trained], tasks, est, subset_stores=[early])
    direct = RegressionEstimator(early, l2=10.0)
    table = direct.evaluate(subsets, direct.fit(subsets), split="validation")
    key = ["subset_id", "task"]
    got_rows = affinity.results.sort_values(key).reset_index(drop=True)
    want_rows = table.sort_values(key).reset_index(drop=True)
    pd.testing.assert_series_equal(got_rows["log_loss"], want_rows["log_loss"])
    np.testing.assert_allclose(affinity.to_numpy(),
                               gradient_affinity(trained, "ntk").to_numpy(), atol=1e-12)  # fmt: skip

    family.level = 1.0  # an F1 no model reaches: the early θ0 learned no task
    with caplog.at_level(logging.WARNING, logger="hf_tae.pipeline.stages"):
        store, info = early_meta_init_store(family, model_args, tasks, pipeline, grad_args,
                                            training(4), tmp_path / "fails", 0)  # fmt: skip
    assert store is None and not info["used"] and info["baseline_avg"] == 1.0
    assert not (tmp_path / "fails/early/gradients").exists()
    assert "early meta-initialization (seed" in caplog.text
    assert "fully trained meta-initializations instead" in caplog.text
    assert "more capacity" not in caplog.text
