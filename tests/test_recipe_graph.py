"""recipes/graph_communities.py end to end: plain python, and accelerate launch with 2 CPU processes."""

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
    assert set(results["label_frequency_baseline_test"]) == set(results["tasks"])
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
        assert values["f1"] == pytest.approx(results["test"][f"test_{name}_f1"], abs=1e-6)

    # --meta_init starts from the saved meta-initialization without training: same test metrics
    again = tmp_path / "again"
    cmd = [sys.executable, str(RECIPE), "--output_dir", str(again), *SMALL,
           "--meta_init", str(out / "meta_init"), "--collect_gradients", "false"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = json.loads((again / "results.json").read_text())
    assert rerun["test"]["test_avg_f1"] == pytest.approx(results["test"]["test_avg_f1"], abs=1e-6)


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
