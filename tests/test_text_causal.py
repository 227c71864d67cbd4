"""The causal instruction family (``instructions_causal``): prompt–completion rows, the tiny
GPT-2 base and its adapters (LoRA from TRL's ModelConfig, (IA)³), bad inputs, and
``hf-tae run instructions_causal`` end to end on a very small configuration."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_tae.errors import TaeError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from text_helpers import tiny_text_family

    return tiny_text_family("instructions_causal", tmp_path_factory.mktemp("base"))


def test_the_family_is_registered_with_its_trainer_score_and_collator(setup):
    from hf_tae.families import family_names
    from hf_tae.models.scores import TokenLogOddsScore
    from hf_tae.trainers.sft import CompletionCollator, SFTMultitaskTrainer

    family, args, _ = setup
    assert "instructions_causal" in family_names()
    assert family.trainer_class is SFTMultitaskTrainer
    score = family.score_function(args)
    assert isinstance(score, TokenLogOddsScore) and score.shift and not score.first_token
    assert family.score_function(dataclasses.replace(args, score_tokens="first")).first_token
    assert isinstance(family.collate_fn(args), CompletionCollator)
    assert family.arguments_class().lora_target_modules == ["c_attn", "c_proj", "c_fc"]


def test_rows_are_prompt_then_completion_with_the_prompt_masked(setup):
    family, _, tasks = setup
    tokenizer = tasks.source.tokenizer
    for row in tasks.dataset.select(range(0, len(tasks.dataset), 7)).to_list():
        prompt = tokenizer(row["input"])["input_ids"]
        completion = tokenizer(row["target"])["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + completion
        assert row["labels"] == [-100] * len(prompt) + completion
        assert row["attention_mask"] == [1] * len(prompt + completion)


def test_prompts_end_with_the_suffix_once(setup, tmp_path):
    family, args, tasks = setup
    inputs = tasks.source.text_tasks.dataset["input"]
    assert inputs[0].startswith("max: ") and all(x.endswith("\nanswer:") for x in inputs)
    assert not any(x.endswith("\nanswer:\nanswer:") for x in inputs)
    tasks.source.text_tasks.save(tmp_path / "data")  # a run's data/: already suffixed
    again = family.load_text_tasks(dataclasses.replace(args, text_tasks=str(tmp_path / "data")))
    assert again.dataset["input"] == inputs
    bare = family.load_text_tasks(dataclasses.replace(args, prompt_suffix=""))
    assert [x + "\nanswer:" for x in bare.dataset["input"]] == inputs


def test_tiny_gpt2_base_is_built_once_and_lora_sits_on_its_conv1d_layers(setup):
    family, args, tasks = setup
    folder = family.tiny_base(args, tasks)
    assert Path(folder, "config.json").is_file() and "tiny-gpt2" in folder
    assert family.tiny_base(args, tasks) == folder  # cached: same folder, not rebuilt
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder)
    assert not base.transformer.wpe.weight.any()  # no absolute positions
    assert base.transformer.wte.weight.std() > 0.1  # initializer_range 0.2, not GPT-2's 0.02
    model = family.model_init(args, tasks)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert any(f"{layer}.lora_A" in n for n in trainable), layer
    ids = torch.tensor([tasks.dataset[0]["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tasks.source.tokenizer))


@pytest.mark.parametrize("name", ["instructions_causal", "instructions"])
def test_ia3_adapters_for_both_families(setup, name, tmp_path):
    from hf_tae.families import get_family

    _, args, _ = setup
    family = get_family(name)
    fields = {f.name for f in dataclasses.fields(family.arguments_class)}
    kwargs = {k: v for k, v in dataclasses.asdict(args).items() if k in fields}
    kwargs.update(adapter="ia3", lora_target_modules=family.arguments_class().lora_target_modules)
    family_args = family.arguments_class(**kwargs)
    tasks = family.load_tasks(family_args)
    model = family.model_init(family_args, tasks)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in n for n in trainable)


def test_lora_targets_that_match_nothing_list_the_gpt2_module_names(setup):
    family, args, tasks = setup
    with pytest.raises(
        TaeError, match=r"--lora_target_modules \['q_proj'\] match no module.*'c_attn'"
    ):
        family.model_init(dataclasses.replace(args, lora_target_modules=["q_proj"]), tasks)


def test_bad_adapter_and_missing_pad_token_name_the_flag(setup, tmp_path):
    family, args, tasks = setup
    with pytest.raises(TaeError, match=r"--adapter 'prefix' is not one of \['lora', 'ia3'\]"):
        family.load_tasks(dataclasses.replace(args, adapter="prefix"))
    saved = tmp_path / "no_pad"
    tokenizer = tasks.source.tokenizer
    tokenizer.save_pretrained(saved)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (saved / "tokenizer_config.json").write_text(json.dumps(config))
    no_pad = dataclasses.replace(args, tokenizer_name_or_path=str(saved))
    with pytest.raises(TaeError, match=r"no pad token.*--pad_token"):
        family.load_tasks(no_pad)
    fixed = family.load_tasks(dataclasses.replace(no_pad, pad_token="</s>"))
    assert fixed.source.pad_token_id == tokenizer.eos_token_id


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "instructions_causal.py"


def test_hf_tae_run_instructions_causal_end_to_end_and_the_meta_init_reloads(tmp_path):
    from transformers import AutoTokenizer

    from hf_tae.families.text import TextTasks
    from hf_tae.hub import load_meta_init

    out = tmp_path / "run"
    args = ["run", "instructions_causal", "--output_dir", str(out), "--skills", "max", "zero",
            "--train_per_template", "8", "--eval_per_template", "4", "--d_model", "32",
            "--d_ff", "64", "--num_heads", "2", "--lora_r", "2",
            "--base_model_dir", str(tmp_path / "base"), "--max_steps", "6", "--eval_steps", "4",
            "--num_meta_inits", "1", "--estimator_l2", "100", "--num_subsets", "20",
            "--max_task_groups", "3", "--projection_dim", "16", "--disable_tqdm", "true"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "hf_tae.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["family"] == "instructions_causal"
    assert results["tasks"] == ["max_0", "max_1", "max_2", "zero_0", "zero_1", "zero_2"]
    assert results["metrics"]["labels"]["accuracy"] == "exact match"
    assert "adjusted_rand_vs_planted" in results["grouping"]
    assert set(results["group_training"]["summary"]) >= {"grouped", "all tasks", "planted groups"}
    assert set(results["timings"]) >= {"data", "meta-initialization", "gradients", "group training"}
    assert (out / "report.md").stat().st_size > 500
    # the saved adapters (on the saved base) and data reproduce the per-task test exact match,
    # counted from plain logits of unpadded sequences
    model = load_meta_init(out / "meta_init")
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    tokens = TextTasks.load(out / "data")
    tokenizer = AutoTokenizer.from_pretrained(out / "data" / "tokenizer")
    test = [r for r in tokens.dataset.to_list() if r["split"] == "test"]
    for t, name in enumerate(tokens.task_names):
        hits = []
        for row in (r for r in test if r["task"] == t):
            prompt = tokenizer(row["input"])["input_ids"]
            gold = tokenizer(row["target"])["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + gold])).logits[0]
            predicted = logits[len(prompt) - 1 : -1].argmax(-1)
            hits.append(bool((predicted == torch.tensor(gold)).all()))
        assert np.mean(hits) == pytest.approx(results["meta_init"]["test"][f"test_{name}_accuracy"])
