"""GradientCollector end to end: every example once, scores and gradients against autograd,
batch-size and world-size invariance, resume after an interruption, the Trainer hooks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_tae import SignConfig, SignForMultiTaskNodeClassification, TaeError
from hf_tae.gradients.collector import GradientCollector
from hf_tae.gradients.store import GradientStore


@pytest.fixture(scope="module")
def setup(small_graph):
    torch.manual_seed(0)
    config = SignConfig(
        in_features=small_graph.x.shape[1],
        num_hops=2,
        hidden_size=6,
        task_names=small_graph.task_names,
    )
    model = SignForMultiTaskNodeClassification(config).eval()
    return model, small_graph.task_set(num_hops=2)


def _collect(model, task_set, path, **kw):
    kw.setdefault("dim", 24)
    return GradientCollector(model, **kw).collect(task_set, path, show_progress=False)


def _same(a: GradientStore, b: GradientStore) -> None:
    for split in ("train", "validation"):
        ta, tb = a.tensors(split), b.tensors(split)
        for key in ("task", "example_id", "label"):
            assert torch.equal(ta[key], tb[key]), key
        torch.testing.assert_close(
            ta["score"], tb["score"], rtol=1e-5, atol=1e-6
        )  # matmul blocking varies with B
        torch.testing.assert_close(ta["grad"], tb["grad"], rtol=1e-5, atol=1e-6)


def test_every_example_once_with_autograd_scores_and_gradients(setup, tmp_path):
    model, task_set = setup
    store = _collect(model, task_set, tmp_path / "store", kind="dense", batch_size=50)
    for split in ("train", "validation"):
        ex = task_set.examples(split)
        t = store.tensors(split)
        got = set(zip(t["task"].tolist(), t["example_id"].tolist(), strict=True))
        assert got == set(zip(ex["task"].tolist(), ex["example_id"].tolist(), strict=True)) and len(
            got
        ) == len(t["task"])
    # independent reference for a few examples: autograd of the task logit, paired with P·w
    t = store.tensors("train")
    hops = task_set.dataset.with_format("torch")["hop_features"]
    collector = GradientCollector(model, dim=24, kind="dense")
    w = torch.randn(24, generator=torch.Generator().manual_seed(1))
    lifted = collector.capture.lift(w)
    params = dict(model.named_parameters())
    for i in (0, 17, len(t["task"]) - 1):
        row, task = int(t["example_id"][i]), int(t["task"][i])
        logit = model(hops[row : row + 1]).logits[0, task]
        assert t["score"][i].item() == pytest.approx(logit.item(), abs=1e-5)
        grads = torch.autograd.grad(logit, [params[name] for name in lifted])
        expected = sum((g * lifted[name]).sum() for g, name in zip(grads, lifted, strict=True))
        assert (t["grad"][i] @ w).item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def test_batch_size_does_not_change_the_store(setup, tmp_path):
    model, task_set = setup
    _same(
        _collect(model, task_set, tmp_path / "a", batch_size=7),
        _collect(model, task_set, tmp_path / "b", batch_size=500),
    )


def test_resume_after_interruption_gives_the_uninterrupted_store(setup, tmp_path, monkeypatch):
    model, task_set = setup
    full = _collect(model, task_set, tmp_path / "full", batch_size=40, rows_per_shard=40)
    calls = {"n": 0}
    original = GradientStore.write_shard

    def dies_on_third_shard(self, rows, rank=0):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, rows, rank)

    monkeypatch.setattr(GradientStore, "write_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _collect(model, task_set, tmp_path / "resumed", batch_size=40, rows_per_shard=40)
    monkeypatch.setattr(GradientStore, "write_shard", original)
    assert len(GradientStore(tmp_path / "resumed").completed_keys()) == 80  # two shards survived
    _same(full, _collect(model, task_set, tmp_path / "resumed", batch_size=40, rows_per_shard=40))


def test_nonfinite_gradients_raise_or_are_skipped(setup, tmp_path):
    model, task_set = setup
    bad_row = int(task_set.examples("train")["example_id"][0])

    class NanOnOneRow:
        name = "nan_on_one_row"

        def __call__(self, outputs, batch):
            logits = outputs.logits.gather(1, batch["task"].view(-1, 1)).squeeze(1)
            scale = torch.where(
                batch["example_id"] == bad_row, float("nan"), 1.0
            )  # a constant: no NaN leak
            return logits * scale

        def config(self):
            return {"name": self.name}

    with pytest.raises(
        TaeError, match=rf"non-finite gradient or score for .*'train', \d+, {bad_row}\)"
    ):
        _collect(model, task_set, tmp_path / "raise", score_fn=NanOnOneRow())
    collector = GradientCollector(model, NanOnOneRow(), dim=24, on_nonfinite="skip")
    store = collector.collect(task_set, tmp_path / "skip", show_progress=False)
    assert collector.skipped and all(s["example_id"] == bad_row for s in collector.skipped)
    kept = torch.cat([store.tensors(split)["example_id"] for split in ("train", "validation")])
    assert bad_row not in kept.tolist()
    expected = sum(len(task_set.examples(split)["task"]) for split in ("train", "validation"))
    assert len(kept) == expected - len(collector.skipped)


def test_trainer_method_and_callback_collect_at_the_trained_weights(small_graph, tmp_path):
    from hf_tae import MultitaskTrainer, MultitaskTrainingArguments
    from hf_tae.trainers.callbacks import GradientCollectorCallback

    task_set = small_graph.task_set(num_hops=2).select(["g0_c0", "g1_c1"])
    torch.manual_seed(0)
    model = SignForMultiTaskNodeClassification(
        SignConfig(
            in_features=small_graph.x.shape[1],
            num_hops=2,
            hidden_size=6,
            task_names=small_graph.task_names,
        )
    )
    callback = GradientCollectorCallback(task_set, tmp_path / "cb_store", dim=16, splits=("train",))
    args = MultitaskTrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=2, learning_rate=1e-2,
                                      use_cpu=True, disable_tqdm=True, save_strategy="no", load_best_model_at_end=False)  # fmt: skip
    trainer = MultitaskTrainer(model=model, args=args, task_set=task_set, callbacks=[callback])
    trainer.train()
    direct = trainer.collect_gradients(tmp_path / "direct", dim=16, splits=("train",))
    assert sorted(set(direct.tensors("train")["task"].tolist())) == [0, 4]
    a, b = callback.store.tensors("train"), direct.tensors("train")
    assert torch.equal(a["example_id"], b["example_id"]) and torch.allclose(
        a["grad"], b["grad"], atol=1e-6
    )


def test_two_processes_write_the_same_store_as_one(setup, tmp_path):
    model, task_set = setup
    model.save_pretrained(tmp_path / "model")
    task_set.dataset.save_to_disk(str(tmp_path / "nodes"))
    script = tmp_path / "collect.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch.distributed as dist
        from datasets import load_from_disk
        from transformers import AutoModel
        from hf_tae import TaskSet
        from hf_tae.gradients.collector import GradientCollector
        from hf_tae.utils.distributed import process_state
        state = process_state()
        assert state.num_processes == int(sys.argv[2]), state.num_processes
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}).eval()
        task_set = TaskSet(load_from_disk({str(tmp_path / "nodes")!r}), task_names=model.config.task_names)
        GradientCollector(model, dim=24, batch_size=13).collect(task_set, sys.argv[1], show_progress=False)
    """)
    )
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    out = subprocess.run(
        [*torchrun, str(script), str(tmp_path / "two"), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    _same(GradientStore.load(tmp_path / "one"), GradientStore.load(tmp_path / "two"))


def test_bad_inputs_are_clear_errors(setup, tmp_path):
    model, task_set = setup
    first = _collect(model, task_set, tmp_path / "store", dim=24)
    _same(first, _collect(model, task_set, tmp_path / "store", dim=24))  # a finished job is a no-op
    with pytest.raises(TaeError, match=r"projector\.dim: store made with 24, you expect 32"):
        _collect(model, task_set, tmp_path / "store", dim=32)  # ... unless made another way
    with pytest.raises(TaeError, match=r"projector\.dim: store made with 24, you expect 32"):
        GradientStore.load(tmp_path / "store", expected_metadata={"projector": {"dim": 32}})
    frozen = SignForMultiTaskNodeClassification(model.config).requires_grad_(False)
    with pytest.raises(TaeError, match="trainable|requires_grad|no parameter"):
        GradientCollector(frozen, dim=8)
    with pytest.raises(TaeError, match="unknown split"):
        GradientCollector(model, dim=8).collect(task_set, tmp_path / "x", splits=("dev",))
