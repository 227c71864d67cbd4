"""TaskSet: naming, selection, per-task rows, the task view and balanced sampling, against brute force."""

import numpy as np
import pytest

from hf_tae import TaeError, TaskBalancedSampler, TaskSet


@pytest.fixture(scope="module")
def task_set(small_graph):
    return small_graph.task_set(num_hops=2)


def test_names_and_selection(task_set, small_graph):
    assert task_set.task_names == small_graph.task_names
    sub = task_set.select(["g1_c2", 0])
    assert sub.task_names == ["g1_c2", "g0_c0"] and sub.task_ids.tolist() == [5, 0]
    assert task_set.num_tasks == 6  # the parent is untouched
    with pytest.raises(TaeError, match="unknown task 'nope'.*known tasks are"):
        task_set.select(["nope"])
    with pytest.raises(TaeError, match="out of range"):
        task_set.select([17])
    with pytest.raises(TaeError, match="twice"):
        task_set.select(["g0_c0", 0])
    with pytest.raises(TaeError, match="empty"):
        task_set.select([])


def test_rows_and_examples_match_brute_force(task_set, small_graph):
    sub = task_set.select(["g0_c1", "g1_c0"])
    for split, code in (("train", 0), ("validation", 1), ("test", 2)):
        for name in sub.task_names:
            t = small_graph.task_names.index(name)
            expected = [v for v in range(small_graph.num_nodes) if small_graph.split[v, t] == code]
            assert sub.rows(name, split).tolist() == expected
        ex = sub.examples(split)
        pairs = {(int(r), int(t)) for r, t in zip(ex["example_id"], ex["task"], strict=True)}
        brute = {
            (v, t)
            for t in sub.task_ids
            for v in range(small_graph.num_nodes)
            if small_graph.split[v, t] == code
        }
        assert pairs == brute and len(pairs) == len(ex["task"])
        assert np.array_equal(
            ex["label"], small_graph.labels[ex["example_id"], ex["task"]].astype(np.float32)
        )


def test_trainer_dataset_masks_exactly_the_split_of_selected_tasks(task_set, small_graph):
    sub = task_set.select(["g0_c2", "g1_c1"])
    ds = sub.trainer_dataset("validation")
    assert set(ds.column_names) == {"hop_features", "labels", "label_mask"}
    mask = (
        ds["label_mask"][:].numpy()
        if hasattr(ds["label_mask"], "numpy")
        else np.stack(list(ds["label_mask"]))
    )
    expected = np.zeros_like(small_graph.labels, dtype=bool)
    for t in sub.task_ids:
        expected[:, t] = small_graph.split[:, t] == 1
    expected = expected[expected.any(1)]
    assert np.array_equal(mask, expected)
    assert ds[0]["hop_features"].shape == (3, small_graph.x.shape[1])


def test_balanced_sampler_draws_every_task_equally_often():
    rows = [np.arange(0, 5), np.arange(5, 105), np.arange(105, 135)]  # task sizes 5, 100, 30
    sampler = TaskBalancedSampler(rows, num_samples=3000, seed=0)
    draws = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(draws) == len(sampler) == 3000
    assert [int(np.isin(draws, r).sum()) for r in rows] == [1000, 1000, 1000]
    # within a task, rows cycle through permutations: each of task 0's 5 rows exactly 200 times
    assert np.bincount(draws[draws < 5]).tolist() == [200] * 5
    assert len(TaskBalancedSampler(rows)) == 135  # default epoch length: the distinct rows
    sampler.set_epoch(1)
    assert not np.array_equal(draws, np.fromiter(iter(sampler), dtype=np.int64))
    with pytest.raises(TaeError, match="no rows"):
        TaskBalancedSampler([np.arange(3), np.array([], dtype=int)])


def test_single_label_layout_reads_classlabel_names():
    from datasets import ClassLabel, Dataset, Features, Value

    ds = Dataset.from_dict(
        {"x": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "labels": [0, 1, 0, 1, 1, 0], "task": [0, 0, 1, 1, 2, 2],
         "split": ["train", "validation", "train", "train", "test", "train"]},
        features=Features({"x": Value("float32"), "labels": Value("int64"),
                           "task": ClassLabel(names=["rte", "wic", "boolq"]), "split": Value("string")}),
    )  # fmt: skip
    ts = TaskSet(ds)
    assert not ts.is_multilabel and ts.task_names == ["rte", "wic", "boolq"]
    assert ts.rows("wic", "train").tolist() == [2, 3]
    assert ts.task_counts("train") == {"rte": 1, "wic": 2, "boolq": 1}
    ex = ts.select(["boolq"]).examples("test")
    assert (
        ex["example_id"].tolist() == [4]
        and ex["task"].tolist() == [2]
        and ex["label"].tolist() == [1.0]
    )
    assert ts.select(["rte", "boolq"]).trainer_dataset("train").num_rows == 2
