"""recipes/instructions.py (= ``hf-tae run instructions``) end to end on a very small digit-skills
configuration; the saved adapters and data reproduce the reported metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "instructions.py"


def test_instructions_recipe_runs_the_pipeline_and_its_meta_init_reloads(tmp_path):
    import torch

    from hf_tae.families.text import TextTasks
    from hf_tae.hub import load_meta_init

    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--skills", "max", "zero", "--train_per_template", "8",
            "--eval_per_template", "4", "--d_model", "32", "--d_ff", "64", "--num_heads", "2",
            "--lora_r", "2", "--base_model_dir", str(tmp_path / "base"), "--max_steps", "6",
            "--eval_steps", "4", "--num_meta_inits", "1", "--estimator_l2", "100", "--num_subsets", "20",
            "--max_task_groups", "3", "--projection_dim", "16", "--compare_single_tasks", "false",
            "--generation_metrics", "true", "--disable_tqdm", "true"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(RECIPE), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["family"] == "instructions"
    assert results["tasks"] == ["max_0", "max_1", "max_2", "zero_0", "zero_1", "zero_2"]
    assert results["metrics"]["labels"]["accuracy"] == "exact match"
    assert results["estimation"]["targets"] == "gold"
    assert "adjusted_rand_vs_planted" in results["grouping"]
    assert set(results["group_training"]["summary"]) == {"grouped", "all tasks", "planted groups"}
    # --generation_metrics: every strategy's generated ROUGE-L and exact match, in the report too
    for summary in results["group_training"]["summary"].values():
        assert 0 <= summary["rougeL"] <= 1 and 0 <= summary["generated_exact_match"] <= 1
    assert "avg ROUGE-L (generated)" in (out / "report.md").read_text()
    assert set(results["timings"]) >= {"data", "meta-initialization", "gradients", "group training"}
    for name in ("report.md", "affinity_by_group.png", "test_accuracy_per_task.png"):
        assert (out / name).stat().st_size > 500, name
    # the saved adapters (on the saved base) and data reproduce the per-task test exact match
    model = load_meta_init(out / "meta_init")
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    tokens = TextTasks.load(out / "data")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "data" / "tokenizer")
    test = tokens.dataset.filter(lambda split: split == "test", input_columns="split")
    for t, name in enumerate(tokens.task_names):
        rows = [r for r in test.to_list() if r["task"] == t]
        hits = []
        for row in rows:
            ids = tokenizer(row["input"])["input_ids"]
            gold = tokenizer(row["target"])["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), labels=torch.tensor([gold])).logits[0]
            hits.append(bool((logits.argmax(-1) == torch.tensor(gold)).all()))
        assert np.mean(hits) == pytest.approx(results["meta_init"]["test"][f"test_{name}_accuracy"])
