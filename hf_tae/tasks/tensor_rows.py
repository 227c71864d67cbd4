"""Trainer rows held as tensors in memory, for fixed-shape columns that fit.

A torch-formatted :class:`datasets.Dataset` gathers every random batch row by row from Arrow
(``Table.fast_gather`` makes one slice per row) and converts each slice on its own; for an
``Array3D`` column (image ``pixel_values``) that costs more than the training step itself
(the image default: 10.5 of 19 s per 600-step run in ``datasets`` formatting). Converting the
rows once to tensors and indexing those gives the same batches at tensor-indexing cost.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset

#: Rows larger than this stay a ``datasets.Dataset`` (streamed from Arrow, memory-mapped).
IN_MEMORY_MAX_BYTES = 1 << 30


class TensorRows(torch.utils.data.Dataset):
    """Map-style dataset of dict rows over in-memory tensors (one per column, first dim rows).

    ``column_names`` mirrors ``datasets.Dataset`` so code that inspects columns keeps working.
    """

    def __init__(self, columns: dict[str, torch.Tensor]):
        sizes = {name: len(value) for name, value in columns.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"columns have different numbers of rows: {sizes}")
        self.columns = columns
        self.column_names = list(columns)
        self._len = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[index] for name, value in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = {name: value[index] for name, value in self.columns.items()}
        return [{name: value[i] for name, value in batch.items()} for i in range(len(indices))]


def _fixed_shape(feature: Any) -> bool:
    """Whether every row of a column with this ``datasets`` feature has the same shape."""
    from datasets import Array2D, Array3D, Array4D, Array5D, ClassLabel, List, Value

    if isinstance(feature, (Value, ClassLabel, Array2D, Array3D, Array4D, Array5D)):
        return True
    if isinstance(feature, List):
        return feature.length != -1 and _fixed_shape(feature.feature)
    return False


def in_memory_rows(dataset: Dataset, max_bytes: int = IN_MEMORY_MAX_BYTES) -> Dataset | TensorRows:
    """``dataset`` as :class:`TensorRows` when every column has a fixed shape declared in its
    features (``Value``, ``ClassLabel``, ``ArrayND``, fixed-length ``List``: graph features,
    image pixels, masks, labels) and its rows take at most ``max_bytes``; otherwise
    ``dataset`` unchanged (ragged token lists, large data)."""
    if dataset.format.get("type") != "torch" or len(dataset) == 0:
        return dataset
    if not all(_fixed_shape(feature) for feature in dataset.features.values()):
        return dataset
    table = dataset.data
    if table.num_rows and table.nbytes * len(dataset) / table.num_rows > max_bytes:
        return dataset
    columns: dict[str, Any] = dataset[:]
    if not all(isinstance(value, torch.Tensor) for value in columns.values()):
        return dataset
    return TensorRows(columns)
