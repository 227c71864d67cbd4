"""In-memory trainer rows: the same batches as the torch-formatted datasets.Dataset they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Array3D, Dataset, Features, List, Value
from transformers import default_data_collator

from hf_tae.tasks.tensor_rows import TensorRows, in_memory_rows


def _images(n=12):
    rng = np.random.default_rng(0)
    features = Features({"pixel_values": Array3D((1, 4, 4), "float32"), "label": Value("int64"),
                         "task": Value("int64"), "mask": List(Value("bool"), length=3)})  # fmt: skip
    rows = {"pixel_values": rng.normal(size=(n, 1, 4, 4)).astype("float32"),
            "label": rng.integers(0, 5, n), "task": rng.integers(0, 3, n),
            "mask": rng.random((n, 3)) > 0.5}  # fmt: skip
    return Dataset.from_dict(rows, features=features)


def test_batches_equal_the_datasets_path():
    ds = _images().select([5, 0, 7, 3, 11, 2, 9]).with_format("torch")  # an indices mapping
    rows = in_memory_rows(ds)
    assert isinstance(rows, TensorRows) and len(rows) == len(ds)
    assert rows.column_names == ds.column_names
    for indices in ([0, 3, 6], [6, 1], [4]):
        expected = default_data_collator(ds.__getitems__(indices))
        got = default_data_collator(rows.__getitems__(indices))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    for i in range(len(ds)):
        for key, value in ds[i].items():
            assert torch.equal(rows[i][key], value)


def test_falls_back_where_rows_do_not_stack_or_do_not_fit():
    ragged = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "label": [0, 1]})
    assert isinstance(in_memory_rows(ragged.with_format("torch")), Dataset)
    # a list column without a declared length stays, even when its rows happen to match
    undeclared = Dataset.from_dict({"input_ids": [[1, 2], [4, 5]], "label": [0, 1]})
    assert isinstance(in_memory_rows(undeclared.with_format("torch")), Dataset)
    images = _images().with_format("torch")
    assert isinstance(in_memory_rows(images, max_bytes=100), Dataset)
    assert isinstance(in_memory_rows(_images()), Dataset)  # not torch-formatted: left alone
    with pytest.raises(ValueError, match="different numbers of rows"):
        TensorRows({"a": torch.zeros(3), "b": torch.zeros(2)})
