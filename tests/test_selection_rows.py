"""The real check of row sources (a column, clusters): which training rows a run keeps, checked
against pandas/numpy references; the selection job with ``--sources column`` end to end and
resumed; and the A.7 error of an estimate against a direct finite-difference computation."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from hf_tae.selection.check import first_order_error, source_task_set
from hf_tae.selection.sources import Sources, with_target_rows

SPLITS = {0: "train", 1: "validation", 2: "test"}


def _table(seed: int = 0, rows: int = 60) -> pd.DataFrame:
    """A single-label table: 3 tasks, a ``group`` column crossing them, random splits."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "x": rng.normal(size=(rows, 3)).tolist(),
        "labels": rng.integers(0, 2, rows),
        "task": rng.integers(0, 3, rows),
        "split": rng.choice(["train", "validation", "test"], rows, p=[0.6, 0.2, 0.2]),
        "group": rng.choice(["a", "b", "c", "d"], rows),
    })  # fmt: skip


def _store(path, table: pd.DataFrame, names: list[str], train_rows: np.ndarray):
    """A gradient store holding the training rows ``train_rows`` (dataset rows) of ``table``."""
    from hf_tae.gradients.store import GradientStore

    store = GradientStore.create(path, {"task_names": names}, dim=2)
    n = len(train_rows)
    store.write_shard({
        "task": table["task"].to_numpy()[train_rows], "example_id": train_rows, "split": "train",
        "label": np.zeros(n, np.float32), "score": np.zeros(n, np.float32),
        "grad": np.ones((n, 2), np.float32),
    })  # fmt: skip
    store.finalize()
    return store


def test_row_sources_keep_the_target_and_chosen_training_rows_and_all_held_out_rows(tmp_path):
    from datasets import Dataset

    from hf_tae.selection.sources import sources_from_column
    from hf_tae.tasks.taskset import TaskSet

    table = _table()
    names = ["t0", "t1", "t2"]
    tasks = TaskSet(Dataset.from_pandas(table), task_names=names, input_columns=["x"])
    train = np.flatnonzero(table["split"] == "train")
    in_store = np.sort(np.random.default_rng(1).choice(train, len(train) - 5, replace=False))
    store = _store(tmp_path / "store", table, names, in_store)
    sources = with_target_rows(sources_from_column(store, table["group"].to_numpy(), "group"),
                               store, "t1")  # fmt: skip
    assert sources.names == ["a", "b", "c", "d", "t1:train"]
    rows = store.tensors("train")
    store_rows = {"example_id": rows["example_id"].numpy(), "task": rows["task"].numpy()}
    view = source_task_set(tasks, sources, store_rows, ["t1:train", "a", "c"], "t1")

    # reference: the target's stored training rows, the stored rows of groups a and c
    stored = table.loc[in_store]
    kept = stored[(stored["task"] == 1) | stored["group"].isin(["a", "c"])]
    expected_tasks = sorted({1, *kept["task"]})
    assert view.task_names == [names[t] for t in expected_tasks]
    assert sorted(view.examples("train")["example_id"]) == sorted(kept.index)
    for split in ("validation", "test"):
        held = table[(table["split"] == split) & table["task"].isin(expected_tasks)]
        assert sorted(view.examples(split)["example_id"]) == sorted(held.index), split
    assert len(view.trainer_dataset("train")) == len(kept)
    # the task set it came from is untouched
    assert sorted(tasks.examples("train")["example_id"]) == sorted(train)


def test_keep_train_examples_on_multi_label_data_keeps_pairs():
    from datasets import Dataset

    from hf_tae.tasks.taskset import TaskSet

    rng = np.random.default_rng(2)
    split = rng.integers(0, 3, size=(20, 3))
    labels = rng.integers(0, 2, size=(20, 3)).astype(np.float32)
    tasks = TaskSet(Dataset.from_dict({"x": rng.normal(size=(20, 2)).tolist(),
                                       "labels": labels.tolist(), "split": split.tolist()}))  # fmt: skip
    rows, cols = np.nonzero(split == 0)
    pick = rng.random(len(rows)) < 0.5
    view = tasks.keep_train_examples(rows[pick], cols[pick])
    expected = {(int(r), int(c)) for r, c in zip(rows[pick], cols[pick], strict=True)}
    ex = view.examples("train")
    assert set(zip(ex["example_id"].tolist(), ex["task"].tolist(), strict=True)) == expected
    ex = view.examples("validation")
    got = set(zip(ex["example_id"].tolist(), ex["task"].tolist(), strict=True))
    assert got == {(int(r), int(c)) for r, c in zip(*np.nonzero(split == 1), strict=True)}


TINY = [
    "--head", "shared", "--target", "target", "--hidden_sizes", "4", "4", "--embedding_size",
    "4", "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
    "--save_strategy", "no", "--load_best_model_at_end", "false", "--projection_dim", "8",
    "--num_subsets", "10", "--truth_subsets", "3", "--random_baselines", "1",
    "--check_each_source", "false", "--estimator_l2", "100", "--representation_module", "none",
    "--first_order_examples", "8", "--disable_tqdm", "true", "--logging_strategy", "no",
    "--report_to", "none", "--sources", "column", "--source_column", "labels",
]  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted benchmark cut to 6 rows per domain and split (the wiring is under test)."""
    from hf_tae.selection.planted import make_selection_domains

    domains = make_selection_domains(target_train=10)
    table = domains.dataset.select_columns(["task", "split"]).to_pandas()
    keep = table.groupby(["task", "split"]).head(6).index.to_numpy()
    domains.dataset = domains.dataset.select(np.sort(keep))
    path = tmp_path_factory.mktemp("planted") / "data"
    domains.save(path)
    return path, domains.dataset.select_columns(["task", "split", "labels"]).to_pandas()


def _key(rows: pd.DataFrame) -> str:
    """The folder of the run on ``rows``: the hash of its (row, task) pairs, task-major."""
    pairs = rows.reset_index().sort_values(["task", "index"])[["index", "task"]]
    data = pairs.to_numpy().T.astype(np.int64)
    return "rows-" + hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest()[:16]


def test_selection_job_checks_column_sources_by_real_training(planted, tmp_path):
    from hf_tae.selection.cli import main

    path, table = planted
    out = tmp_path / "run"
    assert main(["images", "--dataset", str(path), "--output_dir", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    train = table[table["split"] == "train"]
    values = sorted({str(v) for v in train["labels"]})
    assert results["sources"]["names"] == [*values, "target:train"]
    assert results["sources"]["base"] == ["target:train"]
    training = results["training"]
    assert "skipped" not in training
    assert set(training["by_method"]) == set(results["methods"])
    target = results["target"]
    task_id = 0  # the planted target domain
    for method, chosen in results["methods"].items():
        row = training["by_method"][method]
        assert row["sources"] == chosen
        assert 0 <= row["test"] <= 1 and math.isfinite(row["test_log_loss"])
        # the run trained exactly the target's rows plus the rows with the chosen labels
        rows = train[(train["task"] == task_id) | train["labels"].astype(str).isin(chosen)]
        folder = out / "training" / "rows" / _key(rows)
        assert (folder / "results.jsonl").is_file(), (method, chosen)
        records = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
        assert {r["task_name"] for rec in records for r in rec["rows"]} >= {target}
    assert training["estimated_vs_real"]["num_subsets"] >= 3
    # resumable: a rerun trains nothing new
    before = {p: p.read_text() for p in (out / "training").rglob("results.jsonl")}
    assert main(["images", "--dataset", str(path), "--output_dir", str(out), *TINY]) == 0
    after = {p: p.read_text() for p in (out / "training").rglob("results.jsonl")}
    assert after == before


def test_first_order_error_against_finite_differences():
    import torch
    from datasets import Dataset
    from torch.func import functional_call

    from hf_tae.tasks.taskset import TaskSet

    rng = np.random.default_rng(0)
    ds = Dataset.from_dict({"x": rng.normal(size=(16, 3)).tolist(), "labels": [0, 1] * 8,
                            "task": [0] * 16, "split": ["train"] * 6 + ["validation"] * 10})  # fmt: skip
    tasks = TaskSet(ds, task_names=["t"], input_columns=["x"])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(3, 4)
            self.classifier = torch.nn.Linear(4, 2)

        def forward(self, x, task=None):
            return self.classifier(torch.tanh(self.body(x.double())))

    torch.manual_seed(0)
    model = Model().double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in theta0.items()}
    total = sum(p.numel() for p in theta0.values())
    projection = rng.normal(size=(total, 5)) / math.sqrt(total)  # the test's own P

    def lift(w):
        flat, out, start = projection @ np.asarray(w, dtype=np.float64), {}, 0
        for n, shape in shapes.items():
            size = math.prod(shape)
            out[n] = torch.as_tensor(flat[start : start + size]).reshape(shape)
            start += size
        return out

    def score_fn(outputs, batch):  # the logit of the gold class
        return outputs[torch.arange(len(outputs)), batch["example_label"].long()]

    w = rng.normal(size=5) * 0.8
    est = SimpleNamespace(target_name="t", estimator=SimpleNamespace(lift=lift))
    got = first_order_error(model, est, torch.as_tensor(w), tasks, score_fn=score_fn,
                            max_examples=None)  # fmt: skip

    # reference: direct forwards at θ0, θ0 + Δ and a central difference for ∇s·Δ
    delta = lift(w)
    x = torch.as_tensor(np.asarray(ds["x"][6:], dtype=np.float32))  # as the model is fed
    y = torch.as_tensor(ds["labels"][6:])

    def s(step):
        params = {n: theta0[n] + step * delta[n] for n in theta0}
        with torch.no_grad():
            return functional_call(model, params, (x,))[torch.arange(10), y].numpy()

    h = 1e-5
    s0, s_new, jvp = s(0.0), s(1.0), (s(h) - s(-h)) / (2 * h)
    denom = np.maximum(np.abs(s_new), np.abs(s0))
    norm = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
    theta_norm = math.sqrt(sum(float((p**2).sum()) for p in theta0.values()))
    assert got["norm"] == pytest.approx(norm, rel=1e-9)
    assert got["fraction"] == pytest.approx(norm / theta_norm, rel=1e-9)
    assert got["first_order_error"] == pytest.approx(np.mean(((s0 + jvp - s_new) / denom) ** 2),
                                                     rel=1e-5)  # fmt: skip
    assert got["zeroth_order_error"] == pytest.approx(np.mean(((s0 - s_new) / denom) ** 2),
                                                      rel=1e-9)  # fmt: skip
    assert got["first_order_error"] > 0  # a real curvature, not a trivial match
    for n, p in model.named_parameters():  # θ0 put back exactly
        assert torch.equal(p.detach(), theta0[n])


def test_sources_with_target_rows_refuses_a_taken_name(tmp_path):
    from hf_tae.errors import TaeError

    table = _table()
    store = _store(tmp_path / "s", table, ["t0", "t1", "t2"], np.flatnonzero(table["split"] == "train"))
    taken = Sources(np.zeros(len(store.tensors("train")["task"]), np.int64), ["t1:train"], "column")
    with pytest.raises(TaeError, match="already named"):
        with_target_rows(taken, store, "t1")
