"""Images → normalized ``pixel_values`` with PIL and numpy only (no torchvision).

What a transformers vision model needs from :class:`~hf_tae.families.image.domains.ImageDomains`
rows: a float32 ``(C, H, W)`` array per image, resized with PIL, scaled to ``[0, 1]`` and
normalized per channel, as an image processor's ``do_resize / do_rescale / do_normalize`` would.
One batched ``datasets.map`` does the whole column (10k 8×8 PNGs in ~2 s, mostly PNG decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError

if TYPE_CHECKING:
    from datasets import Dataset

_MODES = {1: "L", 3: "RGB"}


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(not isinstance(s, int | np.integer) or s < 1 for s in size):
        raise TaeError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
    return int(size[0]), int(size[1])


def _per_channel(value: float | Sequence[float], num_channels: int, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, num_channels)
    if array.size != num_channels:
        raise TaeError(
            f"{name} needs one value or one per channel ({num_channels}), got {list(array)}."
        )
    if name == "std" and np.any(array <= 0):
        raise TaeError(f"std must be positive in every channel, got {list(array)}.")
    return array


class PixelTransform:
    """Batch function: PIL images → ``{"pixel_values": float32 [N, C, H, W]}``.

    Converts to ``L`` (one channel) or ``RGB`` (three), resizes with ``resample`` when the size
    differs, scales by 1/255 and normalizes with ``(x - mean) / std`` per channel. Usable with
    ``datasets.map(batched=True)`` or ``Dataset.with_transform`` (on-the-fly, for large data).
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        num_channels: int,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        image_column: str = "image",
        resample: int | None = None,
    ):
        from PIL import Image

        if num_channels not in _MODES:
            raise TaeError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels!r}.")
        self.height, self.width = _size(image_size)
        self.num_channels = num_channels
        self.mode = _MODES[num_channels]
        self.mean = _per_channel(mean, num_channels, "mean")[None, :, None, None]
        self.std = _per_channel(std, num_channels, "std")[None, :, None, None]
        self.image_column = image_column
        self.resample = Image.Resampling.BILINEAR if resample is None else resample

    def images_to_array(self, images: Sequence[Any]) -> np.ndarray:
        """Normalized ``float32 [N, C, H, W]`` of a list of PIL images."""
        if len(images) == 0:
            return np.zeros((0, self.num_channels, self.height, self.width), np.float32)
        arrays = []
        for image in images:
            if image is None or not hasattr(image, "convert"):
                raise TaeError(
                    f"column {self.image_column!r} must hold images (datasets.Image()), got "
                    f"{type(image).__name__}."
                )
            if image.mode != self.mode:
                image = image.convert(self.mode)
            if image.size != (self.width, self.height):
                image = image.resize((self.width, self.height), self.resample)
            arrays.append(np.asarray(image, dtype=np.uint8))
        x = np.stack(arrays).astype(np.float32) * np.float32(1 / 255)
        x = x[:, None] if self.num_channels == 1 else x.transpose(0, 3, 1, 2)
        return ((x - self.mean) / self.std).astype(np.float32, copy=False)

    def from_images(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """``{"pixel_values": ...}`` of a list of images (``map(..., input_columns=[image])``)."""
        return {"pixel_values": self.images_to_array(images)}

    def __call__(self, batch: dict[str, list]) -> dict[str, np.ndarray]:
        return self.from_images(batch[self.image_column])


def add_pixel_values(
    dataset: Dataset,
    image_size: int | Sequence[int],
    num_channels: int,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
    batch_size: int = 1000,
    image_column: str = "image",
    resample: int | None = None,
    keep_in_memory: bool = False,
) -> Dataset:
    """The dataset with a ``pixel_values`` column (``Array3D`` float32, ``(C, H, W)``).

    Args:
        dataset: rows with a ``datasets.Image()`` column (other columns are kept).
        image_size: output size, an int (square) or ``(height, width)``.
        num_channels: 1 converts to grayscale (``L``), 3 to ``RGB``.
        mean, std: normalization on the ``[0, 1]`` scale, one value or one per channel (the
            default 0.5, 0.5 maps pixels to [-1, 1]; pretrained backbones want their own, e.g.
            ImageNet's ``(0.485, 0.456, 0.406)``, ``(0.229, 0.224, 0.225)``).
        batch_size: images per ``map`` batch.
        image_column: the image column's name.
        resample: PIL resampling filter for resizing (default bilinear).
        keep_in_memory: passed to ``datasets.map`` (a dataset loaded from disk otherwise gets
            a cache file next to its arrow files).
    """
    from datasets import Array3D, Image

    if image_column not in dataset.column_names:
        raise TaeError(
            f"the dataset has no {image_column!r} column (columns: {dataset.column_names}); "
            "pass image_column= to name it."
        )
    if not isinstance(dataset.features[image_column], Image):
        raise TaeError(
            f"column {image_column!r} is {dataset.features[image_column]}, not datasets.Image(); "
            f"cast it first: dataset.cast_column({image_column!r}, datasets.Image())."
        )
    if batch_size < 1:
        raise TaeError(f"batch_size must be positive, got {batch_size}.")
    transform = PixelTransform(image_size, num_channels, mean, std, image_column, resample)
    features = dataset.features.copy()
    features["pixel_values"] = Array3D(
        shape=(num_channels, transform.height, transform.width), dtype="float32"
    )
    # only the image column goes in, so the other columns are kept as stored, not re-encoded
    return dataset.map(
        transform.from_images,
        input_columns=[image_column],
        batched=True,
        batch_size=batch_size,
        features=features,
        keep_in_memory=keep_in_memory,
        desc="pixel_values",
    )
