"""The selection job on the instruction family (``recipes/select_instructions.py``): a LoRA T5,
templates as sources, the A.7 check through the T5's attention, a report without NaN where the
model has no representation module, and a target that is not a template named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "select_instructions.py"
TINY = ["--skills", "max", "zero", "--train_per_template", "6", "--eval_per_template", "4",
        "--d_model", "32", "--d_ff", "64", "--num_heads", "2", "--lora_r", "2", "--max_steps", "4",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--num_meta_inits", "2", "--num_subsets", "12", "--projection_dim", "16",
        "--first_order_examples", "8", "--truth_subsets", "2", "--random_baselines", "1",
        "--check_each_source", "false", "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip


def _run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(RECIPE), "--base_model_dir", str(tmp_path / "base"),
                           *TINY, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def test_select_instructions_recipe_on_templates(tmp_path):
    out = tmp_path / "run"
    proc = _run(tmp_path, "--output_dir", str(out), "--target", "zero_1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["family"] == "instructions" and results["target"] == "zero_1"
    assert sorted(results["methods"]["all sources"]) == ["max_0", "max_1", "max_2", "zero_0",
                                                         "zero_2"]  # fmt: skip
    assert "first_order_error" in results["first_order"]  # forward-mode AD through sdpa
    assert "representation similarity" not in results["methods"]  # a T5 has no output head
    assert len(results["by_meta_init"]) == 2 and "recommended" in results["training"]
    report = (out / "report.md").read_text()
    assert "nan" not in report.lower() and "| – |" in report


def test_select_instructions_names_a_target_that_is_no_template(tmp_path):
    proc = _run(tmp_path, "--output_dir", str(tmp_path / "bad"), "--target", "even_0")
    assert proc.returncode != 0
    assert "--target 'even_0' is not a task" in proc.stderr
