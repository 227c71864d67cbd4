"""The family contract: a family defined here (single-label tasks, its own model) runs through
the whole pipeline; the registry and the CLI name the families."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest


@dataclass
class ToyArguments:
    """Two planted groups of tasks: rows of a group share one labelling rule."""

    tasks_per_group: int = field(default=2, metadata={"help": "tasks in each of the 2 groups"})
    hidden: int = field(default=8, metadata={"help": "width of the shared layer"})


def _toy_family():
    from datasets import ClassLabel, Dataset, Features, List, Value
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import ImageClassifierOutput

    from hf_tae.families import TaskFamily, TaskMetrics
    from hf_tae.models.scores import GoldLogOddsScore
    from hf_tae.tasks.taskset import TaskSet

    class ToyConfig(PretrainedConfig):
        model_type = "hf_tae_toy_test"

        def __init__(self, hidden=8, task_names=(), **kwargs):
            super().__init__(**kwargs)
            self.hidden, self.task_names = hidden, list(task_names)

    class ToyModel(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.body = nn.Sequential(nn.Linear(4, config.hidden), nn.Tanh())
            self.head = nn.Linear(config.hidden, 3)
            self.post_init()

        def forward(self, x, labels=None, task=None, **kwargs):
            logits = self.head(self.body(x))
            loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
            return ImageClassifierOutput(loss=loss, logits=logits)

    class Toy:
        task_groups = None

    class ToyFamily(TaskFamily):
        name = "toy-test"
        description = "a test family"
        arguments_class = ToyArguments
        training_defaults = {"learning_rate": 5e-2, "num_train_epochs": 8,
                             "per_device_train_batch_size": 32, "metric_for_best_model": "avg_accuracy"}  # fmt: skip
        metrics = TaskMetrics(selection="accuracy", affinity="log_loss",
                              estimated=("accuracy", "log_loss"))  # fmt: skip

        def load_tasks(self, args):
            rng = np.random.default_rng(0)
            n_tasks = 2 * args.tasks_per_group
            rules = rng.normal(size=(2, 4, 3))
            rows = {"x": [], "labels": [], "task": [], "split": []}
            for t in range(n_tasks):
                x = rng.normal(size=(60, 4)).astype(np.float32)
                y = (x @ rules[t // args.tasks_per_group]).argmax(1)
                rows["x"] += list(x)
                rows["labels"] += y.tolist()
                rows["task"] += [t] * 60
                rows["split"] += ["train"] * 36 + ["validation"] * 12 + ["test"] * 12
            names = [f"g{t // args.tasks_per_group}_t{t}" for t in range(n_tasks)]
            features = Features({"x": List(Value("float32"), length=4),
                                 "labels": ClassLabel(num_classes=3),
                                 "task": ClassLabel(names=names), "split": Value("string")})  # fmt: skip
            source = Toy()
            source.task_groups = [t // args.tasks_per_group for t in range(n_tasks)]
            return TaskSet(Dataset.from_dict(rows, features=features), source=source)

        def model_init(self, args, tasks):
            return ToyModel(ToyConfig(hidden=args.hidden, task_names=tasks.all_task_names))

        def score_function(self, args):
            return GoldLogOddsScore(label_key="example_label")

    return ToyFamily


def test_a_family_defined_outside_runs_the_whole_pipeline(tmp_path):
    import torch

    from hf_tae.families import get_family, register_family
    from hf_tae.pipeline import run

    torch.set_num_threads(1)
    family = register_family(_toy_family())
    assert get_family("toy-test").name == "toy-test"
    out = tmp_path / "run"
    results = run(
        ["toy-test", "--output_dir", str(out), "--disable_tqdm", "true", "--num_meta_inits", "2",
         "--subset_size", "2", "--num_task_groups", "2", "--ground_truth", "2",
         "--ground_truth_seeds", "0", "--projection_dim", "16", "--hidden", "6"]
    )  # fmt: skip
    tasks = results["tasks"]
    assert results["family"] == family.name and len(tasks) == 4
    assert results["metrics"]["selection"] == "accuracy"
    # single-label tasks: gold log-odds, every estimate target positive; F1 cannot be estimated
    assert results["estimation"]["targets"] == "gold"
    from hf_tae import AffinityMatrix, GradientStore

    affinity = AffinityMatrix.load(out / "affinity")
    assert affinity.results["f1"].isna().all() and affinity.results["log_loss"].gt(0).all()
    store = GradientStore.load(out / "gradients")
    assert store.metadata["score_function"]["name"] == "gold_log_odds" and store.dim == 16
    # the meta-init's reported test accuracy equals an independent evaluation of the saved model
    meta = results["meta_init"]
    assert meta["test_avg"] == pytest.approx(
        np.mean([meta["test"][f"test_{t}_accuracy"] for t in tasks])
    )
    assert set(meta["baseline_per_task"]) == set(tasks)
    grouping = results["grouping"]
    assert sorted(t for g in grouping["groups"] for t in g) == sorted(tasks)
    assert "adjusted_rand_vs_planted" in grouping
    assert results["planted_labels"] == [0, 0, 1, 1]  # the toy family's two rules
    training = results["group_training"]
    assert set(training["summary"]) == {"grouped", "all tasks", "single task", "planted groups"}
    for name, summary in training["summary"].items():
        per_task = [training["per_task"][t][name] for t in tasks]
        assert summary["accuracy"] == pytest.approx(np.mean(per_task), abs=1e-9)
    assert results["ground_truth"]["num_subsets"] == 2
    report = (out / "report.md").read_text()
    assert "- family: toy-test" in report and "Test average accuracy" in report
    assert (out / "test_accuracy_per_task.png").stat().st_size > 500
    assert json.loads((out / "results.json").read_text())["family"] == "toy-test"


def _register_toy_with_auto_classes(family) -> None:
    """θ0s are read back with the Auto classes: a family from outside registers its model."""
    from transformers import AutoConfig, AutoModel

    model = family().model_init(ToyArguments(), family().load_tasks(ToyArguments()))
    try:
        AutoConfig.register("hf_tae_toy_test", type(model.config))
        AutoModel.register(type(model.config), type(model))
    except ValueError:  # already registered by an earlier test in this process
        pass


def test_estimate_vs_truths_benchmark_reproduces_the_jobs_comparison(tmp_path):
    """benchmarks/estimate_vs_truths.py refits the estimate on a finished run: at the job's λ
    its numbers against the from-scratch truth are the job's own; a resumed run with
    ``--ground_truth_init members`` adds the second truth without retraining the first."""
    import importlib.util

    import torch

    from hf_tae.families import register_family
    from hf_tae.pipeline import run

    torch.set_num_threads(1)
    _register_toy_with_auto_classes(register_family(_toy_family()))
    out = tmp_path / "run"
    argv = ["toy-test", "--output_dir", str(out), "--disable_tqdm", "true", "--num_meta_inits", "2",
            "--subset_size", "2", "--num_task_groups", "2", "--ground_truth", "4",
            "--ground_truth_seeds", "0", "1", "--train_groups", "false", "--projection_dim", "16",
            "--hidden", "6"]  # fmt: skip
    job = run(argv)["ground_truth"]
    scratch_lines = (out / "ground_truth" / "results.jsonl").read_text()
    again = run(argv)["ground_truth"]  # every run reused: nothing timed, no ratio
    assert again["runs"] == 8 and again["runs_trained"] == 0 and again["compute_ratio"] is None
    run([*argv, "--ground_truth_init", "members"])
    assert (out / "ground_truth" / "results.jsonl").read_text() == scratch_lines
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "estimate_vs_truths.py"
    spec = importlib.util.spec_from_file_location("benchmark_estimate_vs_truths", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert list(bench.truths(out)) == ["scratch", "members"]
    rows = bench.compare_run(out, [1.0, 100.0, 10000.0])
    (mine,) = [r for r in rows if r["truth"] == "scratch" and r["job_l2"]]
    assert mine["observed"] == pytest.approx(job["affinity"]["spearman"])
    assert mine["members_agree"] == pytest.approx(job["estimate_self_agreement"]["mean_spearman"])
    assert mine["truth_agree"] == pytest.approx(job["truth_self_agreement"]["mean_spearman"])
    overlaps = {(r["truth"], r["l2"]) for r in rows if isinstance(r["l2"], str)}
    assert overlaps == {(t, k) for t in ("scratch", "members") for k in ("ntk", "fisher")}
    groups = bench.truth_groups(out)
    assert {(g["truth"], g["k"]) for g in groups} == {(t, k) for t in ("scratch", "members")
                                                      for k in (2, 3)}  # 1 < k < 4 tasks


def test_ground_truth_from_the_members_starts_each_repeat_from_its_own_theta0(tmp_path):
    """``--ground_truth_init members``: seed r fine-tunes from meta-initialization r, so each
    member's runs record that member's weights, and the same subset trained from two members
    scores differently; the corrected Spearman is the observed one over both reliabilities."""
    import hashlib

    import pandas as pd
    import torch

    from hf_tae.families import register_family
    from hf_tae.pipeline import run

    torch.set_num_threads(1)
    _register_toy_with_auto_classes(register_family(_toy_family()))
    out = tmp_path / "run"
    results = run(
        ["toy-test", "--output_dir", str(out), "--disable_tqdm", "true", "--num_meta_inits", "2",
         "--subset_size", "2", "--num_task_groups", "2", "--ground_truth", "3",
         "--ground_truth_init", "members", "--ground_truth_seeds", "0", "1",
         "--train_groups", "false", "--projection_dim", "16", "--hidden", "6"]
    )  # fmt: skip
    truth = results["ground_truth"]
    assert truth["init"] == "members" and not (out / "ground_truth").exists()
    tables = []
    for member, theta0 in ((0, out / "meta_init"), (1, out / "ensemble" / "member_1" / "meta_init")):
        folder = out / "ground_truth_members" / f"member_{member}"
        table = pd.read_json(folder / "results.jsonl", lines=True)
        assert sorted(table["seed"].unique()) == [member] and len(table) == 3
        digest = hashlib.sha256(b"meta")  # the recorded start: this member's saved weights
        for path in sorted(theta0.glob("*")):
            if path.suffix in {".safetensors", ".json"}:
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["fingerprint"] == digest.hexdigest()
        tables.append(table)
    losses = [[row["log_loss"] for rows in t.sort_values("subset", key=lambda c: c.map(tuple))["rows"]
               for row in rows] for t in tables]  # fmt: skip
    assert not np.allclose(*losses)  # the same subsets, trained from two different θ0s
    rel_t = truth["truth_self_agreement"]["reliability"]
    rel_e = truth["estimate_self_agreement"]["reliability"]
    if rel_t > 0 and rel_e > 0:
        expected = truth["affinity"]["spearman"] / np.sqrt(rel_t * rel_e)
        assert truth["corrected_spearman"] == pytest.approx(expected)


def test_unknown_family_lists_the_known_ones():
    from hf_tae.errors import TaeError
    from hf_tae.families import family_names, get_family

    assert {"graph", "images"} <= set(family_names())
    with pytest.raises(TaeError, match=r"unknown task family 'nope'; known families: \[.*'graph', 'images'"):
        get_family("nope")


def test_cli_help_lists_families_and_rejects_unknown_ones():
    cli = Path(sys.executable).with_name("hf-tae")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(cli), "run", "--help"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "Families: graph, images" in proc.stdout
    proc = subprocess.run([str(cli), "run", "nope"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "known families: ['graph', 'images', 'instructions', 'instructions_causal']" in proc.stderr


def test_default_scores_follow_the_model_type():
    from torch import nn
    from transformers import ResNetConfig

    from hf_tae.errors import TaeError
    from hf_tae.gradients.collector import GradientCollector
    from hf_tae.models import SignConfig, SignForMultiTaskNodeClassification
    from hf_tae.models.scores import GoldLogOddsScore, TaskLogitScore
    from hf_tae.models.vision import VisionForMultiTaskImageClassification, VisionMultiTaskConfig

    sign = SignForMultiTaskNodeClassification(SignConfig(in_features=3, num_hops=1, num_tasks=2))
    vision = VisionForMultiTaskImageClassification(VisionMultiTaskConfig(
        backbone_config=ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4],
                                     depths=[1]), task_names=["a", "b"], num_labels=3))  # fmt: skip
    assert isinstance(GradientCollector(sign, dim=8).score_fn, TaskLogitScore)
    # a classifier's default is the gold-class log-odds, never the "task logit" of its classes
    assert isinstance(GradientCollector(vision, dim=8).score_fn, GoldLogOddsScore)
    with pytest.raises(TaeError, match="no default score function for model type None"):
        GradientCollector(nn.Linear(3, 2), dim=8)


def test_planted_groups_are_none_unless_every_task_has_one():
    """The base contract: the source's task_groups, None for data without planted groups (no
    groups, or the old all -1 "unknown"), an error for a partly unknown planting, and only the
    tasks of a view."""
    from types import SimpleNamespace

    from hf_tae import TaeError
    from hf_tae.families import TaskFamily

    def tasks(groups, names=("a", "b", "c", "d"), source_names=("a", "b", "c", "d")):
        source = SimpleNamespace(task_groups=groups, task_names=list(source_names))
        return SimpleNamespace(source=source, task_names=list(names))

    family = TaskFamily()
    assert family.planted_groups(tasks([0, 0, 1, 1])).tolist() == [0, 0, 1, 1]
    assert family.planted_groups(tasks(None)) is None
    assert family.planted_groups(tasks([-1, -1, -1, -1])) is None
    assert family.planted_groups(tasks(np.full(4, -1))) is None
    assert family.planted_groups(SimpleNamespace(source=None, task_names=["a"])) is None
    with pytest.raises(TaeError, match="no \\(or a negative\\) planted group for 2 of 4 tasks"):
        family.planted_groups(tasks([0, -1, 1, -1]))
    # a view of tasks c, a of the source: their groups, in the view's order
    assert family.planted_groups(tasks([0, 0, 1, 2], names=("c", "a"))).tolist() == [1, 0]


def test_capacity_options_are_flags_of_each_family():
    """The flags a below-baseline warning names must exist on that family's command line."""
    from hf_tae.families import get_family
    from hf_tae.pipeline.run import build_parser

    for name in ("graph", "images", "instructions", "instructions_causal"):  # the built-in ones
        options = get_family(name).capacity_options
        assert options, name
        flags = {o for action in build_parser(name)._actions for o in action.option_strings}
        assert set(options) <= flags, (name, options)


def test_widen_doubles_the_models_built_from_config_and_only_those(tiny_graph):
    """``widen`` doubles the width of a model built from config (the graph's SIGN model then
    has more parameters) and returns None for a pretrained one (its width is not ours to
    change)."""
    from hf_tae.families import get_family
    from hf_tae.families.graph.family import GraphArguments
    from hf_tae.families.image.family import ImageArguments
    from hf_tae.families.text.causal import CausalInstructionArguments
    from hf_tae.families.text.family import InstructionArguments

    graph = get_family("graph")
    wide = graph.widen(GraphArguments(hidden_size=8))
    assert wide.hidden_size == 16 and wide.num_mlp_layers == 2
    tasks = tiny_graph.task_set(3)

    def size(args):
        return sum(p.numel() for p in graph.model_init(args, tasks).parameters())

    assert size(wide) > size(GraphArguments(hidden_size=8))
    images = get_family("images")
    wide = images.widen(ImageArguments(hidden_sizes=[16, 32], embedding_size=16))
    assert wide.hidden_sizes == [32, 64] and wide.embedding_size == 32
    assert images.widen(ImageArguments(model_name_or_path="microsoft/resnet-18")) is None
    for name, arguments in (("instructions", InstructionArguments),
                            ("instructions_causal", CausalInstructionArguments)):  # fmt: skip
        text = get_family(name)
        wide = text.widen(arguments(d_model=128, d_ff=256, num_heads=4, lora_r=8))
        assert (wide.d_model, wide.d_ff, wide.num_heads, wide.lora_r) == (256, 512, 4, 8)
        assert text.widen(arguments(model_name_or_path="google-t5/t5-small")) is None


def test_truth_starts_give_each_member_every_num_members_th_seed(tmp_path):
    """``--ground_truth_init members`` with 4 seeds and 2 meta-initializations: member m runs
    seeds m and m + 2 in its own folder, from its own θ0; ``group`` keeps one folder and
    every seed."""
    from hf_tae.pipeline.arguments import GroupingArguments
    from hf_tae.pipeline.stages import truth_starts
    from hf_tae.trainers.arguments import MultitaskTrainingArguments

    for folder in (tmp_path / "meta_init", tmp_path / "ensemble" / "member_1" / "meta_init"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"theta0": str(folder)}))
    args = MultitaskTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    members = GroupingArguments(ground_truth_init="members", ground_truth_seeds=[0, 1, 2, 3])
    starts = truth_starts(None, None, None, members, args, tmp_path, num_members=2)
    assert [(folder.relative_to(tmp_path).as_posix(), seeds) for _, _, folder, seeds in starts] == [
        ("ground_truth_members/member_0", [0, 2]), ("ground_truth_members/member_1", [1, 3])]
    assert starts[0][1] != starts[1][1]  # two different θ0 files, two fingerprints
    group = GroupingArguments(ground_truth_init="group", group_init="meta",
                              ground_truth_seeds=[0, 1, 2, 3])  # fmt: skip
    (only,) = truth_starts(None, None, None, group, args, tmp_path, num_members=2)
    assert only[2] == tmp_path / "ground_truth" and only[3] == [0, 1, 2, 3]
    assert only[1] == starts[0][1]  # --group_init meta starts from member 0's θ0
