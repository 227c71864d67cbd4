"""GradientStore: round trips (parquet read independently, datasets, loopback Hub, pinned
revisions), resume after a real SIGKILL, multi-rank merge, de-duplication and bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import hf_tae.gradients.store as store_module
from hf_tae.errors import TaeError
from hf_tae.gradients.store import GradientStore

DIM = 6
TASK_NAMES = ["alpha", "beta", "gamma"]
SPLITS = ("train", "validation", "test")
META = {
    "model": {"id": "tiny-sign", "revision": None},
    "parameters": {"names": ["w1", "w2"], "shapes": [[4, 3], [3]]},
    "projector": {"kind": "dense", "dim": DIM, "seed": 0, "dtype": "float32"},
    "score_function": "margin",
    "task_names": TASK_NAMES,
    "hf_tae_version": "test",
}


def make_rows(examples_per_task: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
    """Every (split, task, example_id) once, in random order, with random values."""
    rng = np.random.default_rng(seed)
    keys = [
        (s, t, e) for s in SPLITS for t in range(len(TASK_NAMES)) for e in range(examples_per_task)
    ]
    perm = rng.permutation(len(keys))
    n = len(keys)
    return {
        "split": np.array([keys[i][0] for i in perm]),
        "task": np.array([keys[i][1] for i in perm], dtype=np.int64),
        "example_id": np.array([keys[i][2] * 7 + 3 for i in perm], dtype=np.int64),
        "label": rng.integers(0, 2, n).astype(np.float32),
        "score": rng.normal(size=n).astype(np.float32),
        "grad": rng.normal(size=(n, DIM)).astype(np.float32),
    }


def batches(rows: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(rows["task"])
    return [{k: v[i : i + size] for k, v in rows.items()} for i in range(0, n, size)]


def canonical(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows in the store's documented order: split (train, validation, test), task, id."""
    codes = np.array([SPLITS.index(s) for s in rows["split"]])
    order = np.lexsort((rows["example_id"], rows["task"], codes))
    return {k: v[order] for k, v in rows.items()}


def read_parquet_directly(path: Path) -> dict[str, np.ndarray]:
    """The data files read with pyarrow alone, in canonical split order (not via the store)."""
    files = [f for s in SPLITS for f in sorted((path / "data").glob(f"{s}-*.parquet"))]
    table = pa.concat_tables(pq.read_table(f) for f in files)
    out = {c: table[c].to_numpy() for c in ("task", "example_id", "label", "score")}
    out["split"] = np.array(table["split"].to_pylist())
    out["grad"] = np.stack(table["grad"].to_numpy(zero_copy_only=False))
    return out


def assert_rows_equal(actual: dict, expected: dict[str, np.ndarray]) -> None:
    for key, value in expected.items():
        if key == "split" and isinstance(actual[key], torch.Tensor):
            value = np.array([SPLITS.index(s) for s in value])
        got = actual[key].numpy() if isinstance(actual[key], torch.Tensor) else actual[key]
        np.testing.assert_array_equal(got, value, err_msg=key)


def write_store(path: Path, parts: list[dict], ranks: list[int] | None = None) -> GradientStore:
    store = GradientStore.create(path, META, DIM)
    for i, rows in enumerate(parts):
        store.write_shard(rows, rank=0 if ranks is None else ranks[i])
    return store.finalize()


# ---------------------------------------------------------------------- round trips
def test_round_trip_layout_and_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_FILE_BYTES", 20 * (4 * DIM + 64))  # 20 rows per file
    rows = make_rows()
    parts = batches(rows, 16)
    parts[1] = {k: torch.as_tensor(v) if k != "split" else v for k, v in parts[1].items()}
    parts[1]["grad"] = parts[1]["grad"].to(torch.float64)  # widths other than float32 are cast
    store = GradientStore.create(tmp_path / "store", META, DIM)
    for part in parts:
        store.write_shard(part)
    assert store.completed_keys() == set(
        zip(rows["split"].tolist(), rows["task"].tolist(), rows["example_id"].tolist(), strict=True)
    )
    store.finalize()
    path = tmp_path / "store"

    expected = canonical(rows)
    assert_rows_equal(read_parquet_directly(path), expected)
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md", "data", "gradient_store.json", "metadata.json",
    ]  # fmt: skip
    assert len(list((path / "data").glob("train-*-of-00002.parquet"))) == 2  # 27 rows, 20 a file
    assert json.loads((path / "metadata.json").read_text()) == META
    card = (path / "README.md").read_text()
    assert "configs:" in card and "path: data/validation-*.parquet" in card
    assert "- hf-tae\n- gradients" in card and '"score_function": "margin"' in card

    loaded = GradientStore.load(path, expected_metadata={"projector": {"dim": DIM}})
    assert (len(loaded), loaded.dim, loaded.task_names) == (len(rows["task"]), DIM, TASK_NAMES)
    assert loaded.metadata == META and loaded.splits == list(SPLITS)
    assert_rows_equal(loaded.tensors(), expected)
    val = expected["split"] == "validation"
    assert_rows_equal(loaded.tensors(split="validation"), {k: v[val] for k, v in expected.items()})
    pick = (expected["split"] == "test") & np.isin(expected["task"], [0, 2])
    subset = loaded.tensors(split="test", tasks=["alpha", 2])
    assert_rows_equal(subset, {k: v[pick] for k, v in expected.items()})
    assert subset["grad"].shape == (int(pick.sum()), DIM)
    assert loaded.tensors(split="train", tasks=[]).keys() == subset.keys()
    assert loaded.tensors(split="train", tasks=[]) ["grad"].shape == (0, DIM)  # fmt: skip


def test_load_dataset_reads_the_folder(tmp_path):
    from datasets import load_dataset

    rows = make_rows(examples_per_task=4)
    write_store(tmp_path / "store", batches(rows, 10))
    train = load_dataset(str(tmp_path / "store"), split="train")
    expected = canonical(rows)
    is_train = expected["split"] == "train"
    assert len(train) == int(is_train.sum())
    assert train.features["grad"].length == DIM
    tensors = train.with_format("torch")[:]
    assert tensors["grad"].shape == (len(train), DIM)
    assert_rows_equal(
        {k: tensors[k] for k in ("task", "example_id", "grad")},
        {k: expected[k][is_train] for k in ("task", "example_id", "grad")},
    )
    assert len(load_dataset(str(tmp_path / "store"), split="test")) == int(
        (expected["split"] == "test").sum()
    )


# ---------------------------------------------------------------------- metadata checks
def test_metadata_mismatch_lists_every_differing_key(tmp_path):
    path = tmp_path / "store"
    rows = make_rows(examples_per_task=2)
    store = GradientStore.create(path, META, DIM)
    store.write_shard(rows)
    other = {**META, "projector": {**META["projector"], "dim": 400, "seed": 1}, "extra": 1}
    with pytest.raises(TaeError) as err:
        GradientStore.create(path, other, DIM)
    message = str(err.value)
    for line in (
        "projector.dim: store made with 6, you pass 400",
        "projector.seed: store made with 0, you pass 1",
        "extra: store made with no such key, you pass 1",
        "overwrite=True",
    ):
        assert line in message
    with pytest.raises(TaeError, match="dim: store made with 6, you pass 8"):
        GradientStore.create(path, META, 8)
    resumed = GradientStore.create(path, META, DIM)  # same metadata: resume, rows kept
    assert len(resumed) == len(rows["task"])
    resumed.finalize()

    with pytest.raises(TaeError, match="finished gradient store"):
        GradientStore.create(path, META, DIM)
    with pytest.raises(TaeError) as err:
        GradientStore.load(
            path, expected_metadata={"projector": {"dim": 400}, "score_function": "ce"}
        )
    message = str(err.value)
    assert "projector.dim: store made with 6, you expect 400" in message
    assert 'score_function: store made with "margin", you expect "ce"' in message
    assert "seed" not in message  # only the keys the caller gives are compared
    fresh = GradientStore.create(path, other, DIM, overwrite=True)
    assert not fresh.finished and len(fresh) == 0 and fresh.metadata == other


# ---------------------------------------------------------------------- crash safety
WRITER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from hf_tae.gradients.store import GradientStore

    path, data, hang_on = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
    real_replace = os.replace

    def replace(src, dst):  # the shard is fully in its temp file; hang before the rename
        if str(dst).endswith(hang_on):
            print("hang", flush=True)
            time.sleep(600)
        real_replace(src, dst)

    os.replace = replace
    store = GradientStore.create(path, {meta!r}, {dim})
    rows = {{k: data[k] for k in data.files}}
    for start in range(0, len(rows["task"]), 10):
        store.write_shard({{k: v[start : start + 10] for k, v in rows.items()}})
        print("wrote", start, flush=True)
    """
)


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    rows = make_rows()
    np.savez(tmp_path / "rows.npz", **rows)
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(meta=META, dim=DIM))
    path = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(tmp_path / "rows.npz"), "000003.parquet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        lines = []
        while not lines or lines[-1] != "hang":
            line = proc.stdout.readline()
            assert line, f"writer exited early: {proc.wait()} {proc.stderr.read()}"
            lines.append(line.strip())
        proc.send_signal(signal.SIGKILL)  # killed in the middle of writing shard 3
    finally:
        proc.kill()
        proc.wait()
    shard_dir = path / "shards"
    assert sorted(p.name for p in shard_dir.glob("*.parquet")) == [
        f"rank00000-{i:06d}.parquet" for i in range(3)
    ]
    assert [p.name for p in shard_dir.glob(".rank00000-000003.parquet.*")]  # the orphaned temp

    store = GradientStore.create(path, META, DIM)
    done = store.completed_keys()
    assert len(done) == 30
    keys = zip(rows["split"], rows["task"].tolist(), rows["example_id"].tolist(), strict=True)
    todo = np.array([key not in done for key in keys])
    for part in batches({k: v[todo] for k, v in rows.items()}, 7):
        store.write_shard(part)
    assert not list(shard_dir.glob(".rank*"))  # the temp file was cleaned up on resume
    store.finalize()

    reference = write_store(tmp_path / "reference", batches(rows, 10))
    resumed = GradientStore.load(path, expected_metadata=META)
    got, want = resumed.tensors(), reference.tensors()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert_rows_equal(got, canonical(rows))


def test_interrupted_finalize_leaves_an_unfinished_store_that_resumes(tmp_path, monkeypatch):
    rows = make_rows(examples_per_task=3)
    store = GradientStore.create(tmp_path / "store", META, DIM)
    for part in batches(rows, 8):
        store.write_shard(part)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store_module, "_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        store.finalize()
    with pytest.raises(TaeError, match="unfinished"):
        GradientStore.load(tmp_path / "store")
    monkeypatch.undo()
    resumed = GradientStore.create(tmp_path / "store", META, DIM)
    assert len(resumed) == len(rows["task"])
    assert_rows_equal(resumed.finalize().tensors(), canonical(rows))
    assert not (tmp_path / "store" / "shards").exists()
    assert not list((tmp_path / "store").glob(".merge-*"))


# ---------------------------------------------------------------------- merging
def test_two_interleaved_ranks_equal_one_rank(tmp_path):
    rows = make_rows()
    parts = batches(rows, 6)
    single = write_store(tmp_path / "single", parts)

    rank0 = GradientStore.create(tmp_path / "multi", META, DIM)
    rank1 = GradientStore.create(tmp_path / "multi", META, DIM)  # second process: resumes
    for i, part in enumerate(parts):
        (rank0, rank1)[i % 2].write_shard(part, rank=i % 2)
    names = sorted(p.name for p in (tmp_path / "multi" / "shards").iterdir())
    assert names[:2] == ["rank00000-000000.parquet", "rank00000-000001.parquet"]
    assert names[-1] == f"rank00001-{len(parts) // 2 - 1:06d}.parquet"
    multi = rank0.finalize()
    a, b = single.tensors(), multi.tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_duplicates_are_dropped_keeping_the_first_written(tmp_path):
    rows = make_rows(examples_per_task=3)
    again = {k: v[:5].copy() for k, v in rows.items()}
    again["grad"] += 1.0  # same keys, other values: the first write wins
    store = GradientStore.create(tmp_path / "store", META, DIM)
    store.write_shard(rows)
    store.write_shard(again)
    store.write_shard({k: v[3:9] for k, v in rows.items()}, rank=1)
    assert len(store) == len(rows["task"])
    store.finalize()
    assert len(store) == len(rows["task"])
    assert_rows_equal(read_parquet_directly(tmp_path / "store"), canonical(rows))


# ---------------------------------------------------------------------- Hub
def test_hub_round_trip_and_pinned_revision(tmp_path, monkeypatch, loopback_hub, hub_repo_id):
    from datasets import load_dataset

    monkeypatch.setattr(store_module, "MAX_FILE_BYTES", 10 * (4 * DIM + 64))
    first_rows = make_rows(examples_per_task=5, seed=1)
    first = write_store(tmp_path / "first", batches(first_rows, 20))
    commit = first.push_to_hub(hub_repo_id)
    assert commit.startswith(loopback_hub.endpoint) and commit.oid in commit
    from_hub = GradientStore.from_hub(hub_repo_id, expected_metadata=META)
    assert_rows_equal(from_hub.tensors(), canonical(first_rows))

    monkeypatch.undo()  # one file per split: the first push's extra files must go
    second_rows = make_rows(examples_per_task=2, seed=2)
    write_store(tmp_path / "second", batches(second_rows, 20)).push_to_hub(hub_repo_id)
    assert_rows_equal(GradientStore.load(hub_repo_id).tensors(), canonical(second_rows))
    train = load_dataset(hub_repo_id, split="train")
    assert len(train) == 2 * len(TASK_NAMES)
    pinned = GradientStore.load(hub_repo_id, revision=commit.oid)
    assert_rows_equal(pinned.tensors(), canonical(first_rows))
    with pytest.raises(TaeError, match="could not download"):
        GradientStore.load(hub_repo_id, revision="no-such-branch")


# ---------------------------------------------------------------------- bad inputs
def _good() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "split": np.array(["train", "train", "validation"]),
        "task": np.array([0, 1, 2]),
        "example_id": np.array([3, 10, 17]),
        "label": np.array([1.0, 0.0, 1.0], dtype=np.float32),
        "score": rng.normal(size=3).astype(np.float32),
        "grad": rng.normal(size=(3, DIM)).astype(np.float32),
    }


def _with(**changes) -> dict:
    rows = _good()
    rows.update(changes)
    return {k: v for k, v in rows.items() if v is not None}


def _nan_grad() -> dict:
    rows = _good()
    rows["grad"] = rows["grad"].copy()
    rows["grad"][1, 2] = np.nan
    return rows


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ({}, "rows is empty"),
        (_with(score=None), r"missing \['score'\]"),
        (_with(weight=np.ones(3)), r"unknown \['weight'\]"),
        (_with(label=np.ones(2, np.float32)), "different lengths"),
        (_with(grad=np.zeros((3, DIM + 1), np.float32)), r"has shape \(3, 7\).*6-dimensional"),
        (_with(split=np.array(["train", "dev", "test"])), r"unknown split\(s\) \['dev'\]"),
        (_nan_grad(), r"1 row\(s\) have NaN/inf.*example_id 10"),
        (_with(score=np.array([0, np.inf, -np.inf])), r"2 row\(s\) have NaN/inf"),
        (_with(task=np.array([0.0, 1.0, 2.0])), "must hold integers"),
        (_with(task=np.array([0, 1, 3])), "metadata names 3 tasks"),
        (_with(example_id=np.array([0, -1, 2])), "negative"),
    ],
    ids=[
        "empty", "missing", "unknown", "lengths", "width", "split", "nan", "inf", "float-ids",
        "task-range", "negative",
    ],
)  # fmt: skip
def test_bad_rows_are_clear_errors(tmp_path, rows, match):
    store = GradientStore.create(tmp_path / "store", META, DIM)
    with pytest.raises(TaeError, match=match):
        store.write_shard(rows)
    assert not list((tmp_path / "store" / "shards").iterdir())  # nothing written


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(TaeError, match="dim must be a positive int"):
        GradientStore.create(tmp_path / "a", META, 0)
    with pytest.raises(TaeError, match="JSON-serializable"):
        GradientStore.create(tmp_path / "a", {"dtype": torch.float32}, DIM)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(TaeError, match="not a gradient store"):
        GradientStore.create(tmp_path / "notes", META, DIM, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").exists()
    with pytest.raises(TaeError, match="not a gradient store"):
        GradientStore.load(tmp_path / "notes")
    with pytest.raises(TaeError, match="neither an existing folder nor a Hub repo id"):
        GradientStore.load(tmp_path / "missing")

    store = GradientStore.create(tmp_path / "store", META, DIM)
    with pytest.raises(TaeError, match="no shards to finalize"):
        store.finalize()
    with pytest.raises(TaeError, match="call finalize"):
        store.tensors()
    assert store.write_shard({k: v[:0] for k, v in _good().items()}) is None  # nothing to write
    store.write_shard(_good(), rank=0)
    with pytest.raises(TaeError, match="rank must be a non-negative int"):
        store.write_shard(_good(), rank=-1)
    store.finalize()
    with pytest.raises(TaeError, match="finished and read-only"):
        store.write_shard(_good())
    with pytest.raises(TaeError, match="revision=.* applies to Hub repos"):
        GradientStore.load(tmp_path / "store", revision="main")
    with pytest.raises(TaeError, match="unknown split 'dev'"):
        store.tensors(split="dev")
    with pytest.raises(TaeError, match="has no 'test' rows"):
        store.tensors(split="test")
    with pytest.raises(TaeError, match="unknown task 'delta'"):
        store.tensors(tasks=["delta"])
