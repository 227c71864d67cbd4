"""``--merge_methods name:key=value,...``: the option parser against hand-written expectations
and bad inputs; the recommendation over grouped / all tasks / single task / merged models on
hand-built validation tables; the pipeline stage passing options through to the merge (graph
family); and the early refusal of peft (LoRA) group models."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from hf_tae import MultitaskTrainingArguments, TaeError
from hf_tae.merging.registry import parse_method_choice, parse_method_choices
from hf_tae.pipeline import stages
from hf_tae.pipeline.arguments import EstimationArguments, GroupingArguments, check_arguments

# ---------------------------------------------------------------- the option parser


@pytest.mark.parametrize(
    ("text", "method", "params", "label", "folder"),
    [
        ("average", "average", {}, "average", "average"),
        ("ties:density=0.2,lambda=0.8", "ties", {"density": 0.2, "lam": 0.8},
         "ties density=0.2 lambda=0.8", "ties_density=0.2_lambda=0.8"),
        ("regmean:alpha=0.9", "regmean", {"alpha": 0.9}, "regmean alpha=0.9",
         "regmean_alpha=0.9"),
        (" ties : trim = global , lam=1 ", "ties", {"trim": "global", "lam": 1.0},
         "ties trim=global lam=1.0", "ties_trim=global_lam=1.0"),
        ("mats:objective=kfac,max_iter=5,rtol=1e-6", "mats",
         {"objective": "kfac", "max_iter": 5, "rtol": 1e-6},
         "mats objective=kfac max_iter=5 rtol=1e-06", "mats_objective=kfac_max_iter=5_rtol=1e-06"),
        ("dare_ties:seed=none", "dare_ties", {"seed": None}, "dare_ties seed=None",
         "dare_ties_seed=None"),
        ("dare_linear:seed=7", "dare_linear", {"seed": 7}, "dare_linear seed=7",
         "dare_linear_seed=7"),
    ],
)  # fmt: skip
def test_options_are_parsed_and_typed_by_the_methods_parameters(text, method, params, label,
                                                                 folder):  # fmt: skip
    choice = parse_method_choice(text)
    assert (choice.method, choice.label, choice.folder) == (method, label, folder)
    assert choice.params == params
    # typed, not merely equal: 5 is an int, 0.2 a float, 'kfac' a str
    assert {k: type(v) for k, v in choice.params.items()} == {k: type(v) for k, v in params.items()}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tie", r"unknown merge method 'tie'; choose one of \[.*'ties'"),
        ("ties:foo=1", r"'ties' has no parameter\(s\) \['foo'\]; its parameters are "
                       r"\['density', 'lam', 'sign_method', 'trim'\]"),
        ("regmean:lambda=0.5", r"'regmean' has no parameter\(s\) \['lam'\]; .*\['alpha', 'ridge'\]"),
        ("ties:density=abc", r"'ties': density='abc' is not a valid float"),
        ("mats:max_iter=2.5", r"'mats': max_iter='2.5' is not a valid int"),
        ("dare_ties:seed=x", r"'dare_ties': seed='x' is not a valid int \| None"),
        ("ties:density", r"'ties': option 'density' is not key=value"),
        ("ties:density=0.2,", r"'ties': option '' is not key=value"),
        ("ties:=0.2", r"option '=0.2' is not key=value"),
        ("ties:density=0.1,density=0.2", r"option 'density' given twice"),
        ("ties:lam=1,lambda=2", r"both 'lambda' and 'lam' given"),
    ],
)  # fmt: skip
def test_bad_options_name_the_method_the_option_and_the_valid_ones(text, message):
    with pytest.raises(TaeError, match=message):
        parse_method_choice(text)


def test_two_spellings_of_one_merge_are_refused():
    with pytest.raises(TaeError, match="'ties' and 'ties density=0.2' are the same merge"):
        parse_method_choices(["ties", "ties:density=0.2"])
    with pytest.raises(TaeError, match="'ties lam=0.5' and 'ties lambda=0.5' are the same"):
        parse_method_choices(["ties:lam=0.5", "ties:lambda=0.5"])
    assert len(parse_method_choices(["ties", "ties:density=0.5", "average"])) == 3


def test_check_arguments_fails_on_bad_options_before_training():
    est = EstimationArguments()
    with pytest.raises(TaeError, match=r"--merge_methods: merge method 'ties' has no parameter"):
        check_arguments(est, GroupingArguments(merge_methods=["ties:foo=1"]))
    with pytest.raises(TaeError, match="--merge_methods: .*not a valid float"):
        check_arguments(est, GroupingArguments(merge_methods=["regmean:alpha=high"]))
    with pytest.raises(TaeError, match="--merge_methods mats objective=fisher_block: .*block-Fisher"):
        check_arguments(est, GroupingArguments(merge_methods=["mats:objective=fisher_block"]))
    check_arguments(est, GroupingArguments(merge_methods=["ties:density=0.2,lambda=0.8", "average"]))


def test_the_yaml_config_shares_the_lambda_alias(tmp_path, monkeypatch):
    """``hf-tae merge``'s YAML parameters go through the same alias rule as the flag."""
    from hf_tae.merging import cli

    seen = {}
    monkeypatch.setattr("hf_tae.merging.engine.merge", lambda *a, **kw: seen.update(kw))
    cli.merge_from_config({"merge_method": "ties", "models": ["a", "b"], "base_model": "base",
                           "parameters": {"lambda": 0.7, "density": 0.3}}, str(tmp_path))  # fmt: skip
    assert seen["lam"] == 0.7 and seen["density"] == 0.3 and "lambda" not in seen
    with pytest.raises(TaeError, match="both 'lambda' and 'lam'"):
        cli.merge_from_config({"merge_method": "ties", "models": ["a"],
                               "parameters": {"lambda": 0.7, "lam": 1}}, str(tmp_path))  # fmt: skip


# ---------------------------------------------------------------- the recommendation

NAMES = ["a", "b"]
# hand-built validation and test scores per strategy and task (f1 = accuracy; log_loss = 1 − f1)
VALIDATION = {"grouped": (0.9, 0.7), "all tasks": (0.6, 0.6), "single task": (0.5, 0.7)}
TEST = {"grouped": (0.8, 0.6), "all tasks": (0.5, 0.5), "single task": (0.4, 0.6)}


def _row(strategy, t, value, group):
    return {"strategy": strategy, "task": t, "task_name": NAMES[t], "group": group,
            "group_size": len(group), "f1": value, "accuracy": value, "log_loss": 1.0 - value}  # fmt: skip


def _table(scores):
    groups = {"grouped": [["a"], ["b"]], "all tasks": [NAMES, NAMES],
              "single task": [["a"], ["b"]]}  # fmt: skip
    return pd.DataFrame([_row(s, t, v, groups[s][t]) for s, vs in scores.items()
                         for t, v in enumerate(vs)])  # fmt: skip


def _merged(validation, test):
    rows = {split: [{"task": t, "task_name": NAMES[t], "f1": v, "accuracy": v, "log_loss": 1 - v}
                    for t, v in enumerate(values)]
            for split, values in (("validation", validation), ("test", test))}  # fmt: skip
    return {"method": "ties", "parameters": {"density": 0.2, "lam": 0.8},
            "path": "/run/merged/ties_density=0.2_lambda=0.8", "seconds": 0.1, "skipped": False,
            "private": 0, "scores": rows}  # fmt: skip


def _recommend(monkeypatch, tmp_path, merged_validation, metric="f1", recommend_merged=True):
    """train_groups on hand-built tables: group training and the merge stage replaced."""
    tables = {"test": _table(TEST), "validation": _table(VALIDATION)}
    monkeypatch.setattr("hf_tae.evaluation.group_training.compare_group_training",
                        lambda *a, split, **kw: tables[split])  # fmt: skip
    label = "ties density=0.2 lambda=0.8"
    merged = {label: _merged(merged_validation, (0.3, 0.5))}
    monkeypatch.setattr(stages, "merge_groups", lambda *a, **kw: merged)
    grouping = GroupingArguments(merge_methods=["ties:density=0.2,lambda=0.8"],
                                 recommend_merged=recommend_merged)  # fmt: skip
    args = MultitaskTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    tasks = SimpleNamespace(task_names=NAMES)
    return stages.train_groups(lambda: torch.nn.Linear(1, 1), tasks, [["a"], ["b"]], args,
                               grouping, tmp_path, None, metric)  # fmt: skip


MERGED = "merged (ties density=0.2 lambda=0.8)"


@pytest.mark.parametrize(
    ("merged_validation", "expected"),
    [
        ((0.95, 0.75), MERGED),  # mean 0.85 > grouped 0.8
        ((0.8, 0.6), "grouped"),  # mean 0.7 < grouped 0.8
        ((1.0, 0.6), "grouped"),  # mean 0.8 = grouped 0.8: a tie keeps the estimate's groups
        ((0.81, 0.81), MERGED),  # 0.81 > 0.8, although worse than grouped on task a
    ],
)
def test_a_merged_model_is_recommended_exactly_when_its_validation_score_is_best(
    monkeypatch, tmp_path, merged_validation, expected
):
    info = _recommend(monkeypatch, tmp_path, merged_validation)
    rec = info["recommended"]
    assert rec["strategy"] == expected
    expected_validation = {"grouped": 0.8, "all tasks": 0.6, "single task": 0.6,
                           MERGED: sum(merged_validation) / 2}  # fmt: skip
    assert rec["validation"] == pytest.approx(expected_validation)
    if expected == MERGED:  # one model for all tasks, and where it is
        assert rec["groups"] == [NAMES]
        assert rec["path"] == "/run/merged/ties_density=0.2_lambda=0.8"
        assert rec["test"] == pytest.approx(0.4)  # mean of the merged model's test (0.3, 0.5)
    else:
        assert rec["groups"] == [["a"], ["b"]] and "path" not in rec
        assert rec["test"] == pytest.approx(0.7)
    merged = info["merged"]["ties density=0.2 lambda=0.8"]
    assert merged["parameters"] == {"density": 0.2, "lam": 0.8}
    assert merged["validation"] == pytest.approx(sum(merged_validation) / 2)


def test_lower_is_better_metrics_recommend_the_lowest_loss(monkeypatch, tmp_path):
    # log_loss = 1 − score: merged 0.1 against grouped 0.2
    info = _recommend(monkeypatch, tmp_path, (0.9, 0.9), metric="log_loss")
    assert info["recommended"]["strategy"] == MERGED
    info = _recommend(monkeypatch, tmp_path, (0.7, 0.7), metric="log_loss")
    assert info["recommended"]["strategy"] == "grouped"


def test_recommend_merged_false_leaves_merged_models_out(monkeypatch, tmp_path):
    info = _recommend(monkeypatch, tmp_path, (0.99, 0.99), recommend_merged=False)
    assert info["recommended"]["strategy"] == "grouped"
    assert set(info["recommended"]["validation"]) == {"grouped", "all tasks", "single task"}
    assert MERGED in info["summary"]  # still compared, only not recommended


def test_report_names_the_recommended_merged_model(monkeypatch, tmp_path):
    from hf_tae.pipeline.report import render_report

    info = _recommend(monkeypatch, tmp_path, (0.95, 0.75))
    labels = {"f1": "F1", "accuracy": "accuracy", "log_loss": "BCE"}
    results = {"family": "graph", "data": "tiny", "command": "test", "world_size": 1,
               "timings": {}, "metrics": {"selection": "f1", "labels": labels},
               "meta_init": {"test_avg": 0.5}, "group_training": info}  # fmt: skip
    text = render_report(results)
    assert (f"**Recommended: {MERGED}** (1 model(s) at `/run/merged/ties_density=0.2_lambda=0.8`):"
            " the best validation F1 of grouped 0.800, all tasks 0.600, single task 0.600, "
            f"{MERGED} 0.850; its test F1 is 0.400.") in text  # fmt: skip
    json.dumps(info)  # results.json stays JSON


# ---------------------------------------------------------------- the stage, with options


def test_the_stage_merges_with_the_given_options(tiny_graph, tmp_path):
    """The options reach the merge (merge_config.json's parameters, written by hand here) and
    the folder and row label follow the flag."""
    from hf_tae import MultitaskTrainer, SignConfig, SignForMultiTaskNodeClassification
    from hf_tae.families import get_family

    tasks = tiny_graph.task_set(num_hops=2)

    def init():
        config = SignConfig(in_features=6, num_hops=2, hidden_size=4,
                            task_names=tiny_graph.task_names)  # fmt: skip
        return SignForMultiTaskNodeClassification(config)

    args = MultitaskTrainingArguments(output_dir=str(tmp_path / "args"), learning_rate=1e-2,
                                      num_train_epochs=1, per_device_train_batch_size=64,
                                      use_cpu=True, disable_tqdm=True, report_to="none")  # fmt: skip
    grouping = GroupingArguments(merge_methods=["ties:density=0.5,lambda=0.8"],
                                 compare_single_tasks=False)  # fmt: skip
    groups = [["g0_c0", "g0_c1"], ["g1_c0", "g1_c1"]]
    info = stages.train_groups(init, tasks, groups, args, grouping, tmp_path, None, "f1",
                               MultitaskTrainer,
                               private_parameters=get_family("graph").private_parameters)  # fmt: skip
    folder = tmp_path / "merged" / "ties_density=0.5_lambda=0.8"
    record = json.loads((folder / "merge_config.json").read_text())
    assert record["parameters"] == {"density": 0.5, "lam": 0.8, "sign_method": "total",
                                    "trim": "tensor"}  # fmt: skip
    assert "merged (ties density=0.5 lambda=0.8)" in info["summary"]
    assert info["merged"]["ties density=0.5 lambda=0.8"]["path"] == str(folder)
    assert "merged (ties density=0.5 lambda=0.8)" in info["recommended"]["validation"]


# ---------------------------------------------------------------- LoRA group models


def test_lora_group_models_are_refused_before_any_training(monkeypatch, tmp_path):
    """The instructions family trains LoRA adapters; the stage does not merge them, and says
    so before the first group model is trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    def lora_t5():
        config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
        lora = LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
        return get_peft_model(T5ForConditionalGeneration(config), lora)

    def never(*_a, **_kw):
        raise AssertionError("group training started")

    monkeypatch.setattr("hf_tae.evaluation.group_training.compare_group_training", never)
    args = MultitaskTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    grouping = GroupingArguments(merge_methods=["average"])
    with pytest.raises(TaeError, match=r"trains peft adapters \(PeftModel.*\).*Drop "
                                       r"--merge_methods, or merge saved adapters with "
                                       r"hf_tae.merge\(base="):  # fmt: skip
        stages.train_groups(lora_t5, SimpleNamespace(task_names=NAMES), [["a"], ["b"]], args,
                            grouping, tmp_path, None, "f1")  # fmt: skip
