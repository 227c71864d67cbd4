"""recipes/images.py (= ``hf-tae run images``) end to end, on the digits default and on a
DomainNet-layout folder written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "images.py"
SMALL = ["--max_steps", "40", "--disable_tqdm", "true", "--num_meta_inits", "2",
         "--num_subsets", "20", "--num_task_groups", "0", "--max_task_groups", "4",
         "--projection_dim", "32"]  # fmt: skip


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _run(args, cwd):
    proc = subprocess.run([sys.executable, str(RECIPE), *args], env=_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_images_recipe_on_the_digits_default_reproduces_its_metrics(tmp_path):
    import torch
    from sklearn.metrics import accuracy_score
    from transformers import AutoModel

    from hf_tae import ImageDomains, add_pixel_values

    out = tmp_path / "run"
    _run(["--output_dir", str(out), *SMALL, "--group_seeds", "0"], tmp_path)
    results = json.loads((out / "results.json").read_text())
    tasks = results["tasks"]
    assert results["family"] == "images" and len(tasks) >= 6
    assert results["estimation"]["targets"] == "gold"
    assert set(results["grouping"]) >= {"groups", "adjusted_rand_vs_planted", "sweep"}
    assert set(results["group_training"]["summary"]) == {
        "grouped", "all tasks", "single task", "planted groups"}  # fmt: skip
    for name in ("report.md", "affinity_by_group.png", "grouping_gains.png",
                 "test_accuracy_per_task.png"):  # fmt: skip
        assert (out / name).stat().st_size > 500, name
    # the saved data and meta-initialization reproduce the reported per-domain test accuracy
    domains = ImageDomains.load(out / "data")
    model = AutoModel.from_pretrained(out / "meta_init").eval()
    data = add_pixel_values(domains.dataset, image_size=8, num_channels=1, mean=0.5, std=0.5)
    test = data.filter(lambda split: split == "test", input_columns="split").with_format("torch")
    with torch.no_grad():
        logits = model(pixel_values=test["pixel_values"][:], task=test["task"][:]).logits
    pred, labels, task = logits.argmax(1).numpy(), test["labels"][:].numpy(), test["task"][:].numpy()
    for t, name in enumerate(domains.task_names):
        rows = task == t
        assert accuracy_score(labels[rows], pred[rows]) == pytest.approx(
            results["meta_init"]["test"][f"test_{name}_accuracy"], abs=1e-6
        )


def test_images_recipe_on_a_domainnet_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "domainnet"
    classes = ["zebra", "apple", "moon"]  # list indices not in alphabetical order
    for domain in ("clipart", "sketch", "real"):
        for split, count in (("train", 8), ("test", 4)):
            lines = []
            for index, cls in enumerate(classes):
                (root / domain / cls).mkdir(parents=True, exist_ok=True)
                for k in range(count):
                    name = f"{domain}/{cls}/{domain}_{split}_{k:03d}.jpg"
                    pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                    pixels[..., index] = 255  # the class shows in one colour channel
                    Image.fromarray(pixels).save(root / name)
                    lines.append(f"{name} {index}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    _run(["--output_dir", str(out), "--domainnet_root", str(root), "--image_size", "8",
          *SMALL, "--compare_single_tasks", "false", "--num_meta_inits", "1",
          "--subset_size", "2"], tmp_path)  # fmt: skip
    # an option that cannot work with the data fails before any training
    proc = subprocess.run([sys.executable, str(RECIPE), "--output_dir", str(tmp_path / "bad"),
                           "--domainnet_root", str(root), "--subset_size", "5"], env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "--subset_size 5 exceeds the 3 tasks" in proc.stderr
    assert not (tmp_path / "bad" / "meta_init").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["clipart", "real", "sketch"]
    assert "planted groups" not in results["group_training"]["summary"]  # real data: none
    assert "adjusted_rand_vs_planted" not in results["grouping"]
    config = json.loads((out / "meta_init" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == classes
    assert config["backbone_config"]["num_channels"] == 3
