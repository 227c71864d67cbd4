"""The embedded image default: scikit-learn's real 8×8 digits in domains with planted groups.

Every domain is a *view* (a geometric transform) combined with a *style* (a photometric one)
of real handwritten digits from :func:`sklearn.datasets.load_digits` (1,797 images, 10 classes,
bundled with scikit-learn, no download). The default has 4 views × 2 styles = 8 domains:

* group 0, view ``upright`` (the digit as written): ``upright-clean``, ``upright-noisy``;
* groups 1–3, views ``tiles-a``, ``tiles-b``, ``tiles-c``: the digit's sixteen 2×2 tiles
  rearranged by a fixed permutation of the view (:func:`tile_permutation`; every tile moves):
  ``tiles-a-clean``, ``tiles-a-noisy``, … ``tiles-c-noisy``.

Styles: ``clean`` leaves the pixels alone; ``noisy`` adds Gaussian noise (``noise_std`` on the
[0, 1] scale, clipped). Other styles: ``blurred`` (3×3 binomial), ``inverted``, ``edges``
(Sobel magnitude), ``low-contrast``; other views: ``tiles-d``, ``rot90``, ``rot180``,
``rot270``, ``fliplr``, ``flipud``, ``transpose``, ``jigsaw`` (4×4 quadrants reversed).

**What is planted, and why.** The groups are the *views*. Within a view the strokes of a digit
sit in the same places, so a same-view partner is more data for exactly the features the target
needs: partners of the same view help. Across views the same strokes sit elsewhere; the
pipeline's tiny backbone (a ResNet with 16/32 channels whose 7×7 stem sees most of an 8×8
image, close to an MLP on pixels) has to learn a separate reading for every arrangement, and
four arrangements compete for its capacity: a partner of another view costs the target, and one
model on all domains is worse even than one model per domain. Views were chosen *by
measurement*: with three views (upright, rot90, jigsaw, or three tile views) a partner of
another view was neutral (about ±1 point) and one model per group beat one model on all domains
by 1.5–3.6 points; with four tile views such a partner costs ~3 points and the margin is ~6. A tile permutation keeps only 2×2 texture, like the pixel permutations of "permuted
MNIST", the standard benchmark of interfering tasks, while a rotated stroke is still a stroke.
The styles are a decoy for similarity measures that look at pixels: noisy domains of different
views share their image statistics, yet cross-view partners hurt on average, so finding the
groups takes training dynamics (gradients), not pixel statistics.

Measured (scratch experiment; the pipeline's tiny ResNet ``embedding_size=16,
hidden_sizes=[16, 32], depths=[1, 1]``, one linear head per domain, AdamW lr 1e-2 decaying
linearly, batch 64, 600 steps per run, final model; test accuracy, mean ± s.e. over 3 seeds):
one domain alone 84.2 ± 0.7; with a same-view partner +3.3 ± 0.8 points, with another view's
partner −3.2 ± 0.7; all 8 domains in one model 81.4 ± 0.2; one model per view 87.5 ± 0.3
(beats all-in-one by 5.3–6.8 points in every seed); all 8 with one shared head 80.3 ± 0.5.
Give every run the same number of steps: with a fixed number of epochs, single domains get
too few steps and all-in-one wins for that reason alone.

**Images per domain.** Source digits are split once (stratified by class, seeded) into a
training pool (60%) and held-out validation (10%) and test (30%) pools. The training pool is
*partitioned*: every domain trains on its own, disjoint digits (stratified by class; ~135 for 8
domains), so a partner brings new handwriting, as a DomainNet domain brings new photos, and
transfer cannot come from seeing the same digit twice. Every domain is evaluated on all
held-out digits in its own view and style (its own noise draw): no held-out digit is a
training digit of *any* domain, and every domain gets ~540 test images (±1.5 points of
accuracy) instead of ~70.

**Knobs for harder variants.** ``conflict`` in [0, 1]: the share of the 16 tiles a ``tiles-*``
view moves (1: all; 0.5: 8 of them, so views share half their layout, and per-view models still
beat all-in-one by ~4 points; 0.25: the margin is within noise; 0: every view is upright, the
groups are planted in name only and all-in-one wins by ~5). ``train_per_domain``: fewer
training digits per domain (100: the structure holds, per-view models beat all-in-one by ~6). ``noise_std``: how hard the noisy style is. ``views`` / ``styles``: other domains
(e.g. 5 views × 2 styles = 10 domains, or the rotation views for a weak-structure variant).

Images are stored as 8-bit grayscale PNGs (``datasets.Image()``); the ``path`` column holds the
source digit (``sklearn-digits/<index>``). One seed gives the same data.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.image.domains import ImageDomains, contract_features, stratified_split

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# --------------------------------------------------------------------------- transforms
# All act on a float stack ``[N, 8, 8]`` in [0, 1] (any square size for the geometric ones).
def _identity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x


def _jigsaw(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Quadrants (top-left, top-right, bottom-left, bottom-right) placed in reverse order."""
    h, w = x.shape[1] // 2, x.shape[2] // 2
    tl, tr, bl, br = x[:, :h, :w], x[:, :h, w:], x[:, h:, :w], x[:, h:, w:]
    return np.concatenate(
        [np.concatenate([br, bl], axis=2), np.concatenate([tr, tl], axis=2)], axis=1
    )


def binomial_blur(x: np.ndarray) -> np.ndarray:
    """3×3 binomial blur (kernel [1, 2, 1]/4 per axis), edge pixels repeated at the border."""
    p = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="edge")
    x = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    p = np.pad(x, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return 0.25 * p[:, :, :-2] + 0.5 * p[:, :, 1:-1] + 0.25 * p[:, :, 2:]


def sobel_edges(x: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude, scaled to a maximum of 1 per image."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (
        p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2]
    )
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (
        p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:]
    )
    magnitude = np.hypot(gx, gy)
    return magnitude / np.maximum(magnitude.max(axis=(1, 2), keepdims=True), 1e-6)


TILE = 2
"""Side of the square tiles the ``tiles-*`` views rearrange (an 8×8 digit has 16 tiles)."""


def tile_permutation(view: str, conflict: float, num_tiles: int = 16) -> np.ndarray:
    """Where every tile of a ``tiles-*`` view comes from: ``out_tile[i] = in_tile[perm[i]]``.

    A fixed order of the tiles per view name (seeded by the name) and the first
    ``round(conflict × num_tiles)`` of them moved one step along a cycle; the rest stay in
    place. So lower ``conflict`` moves a subset of the same tiles, and every moved tile does
    move (a cycle has no fixed point).
    """
    order = np.random.default_rng(zlib.crc32(view.encode())).permutation(num_tiles)
    k = int(round(conflict * num_tiles))
    perm = np.arange(num_tiles)
    if k >= 2:
        moved = order[:k]
        perm[moved] = np.roll(moved, 1)
    return perm


def rearrange_tiles(x: np.ndarray, perm: np.ndarray, tile: int = TILE) -> np.ndarray:
    """Rearrange the ``tile × tile`` tiles of a stack ``[N, H, W]`` (row-major tile order)."""
    n, h, w = x.shape
    rows, cols = h // tile, w // tile
    tiles = x.reshape(n, rows, tile, cols, tile).transpose(0, 1, 3, 2, 4).reshape(n, -1, tile, tile)
    tiles = tiles[:, perm]
    return tiles.reshape(n, rows, cols, tile, tile).transpose(0, 1, 3, 2, 4).reshape(n, h, w)


def _tiles(view: str) -> Callable[[float], Transform]:
    return lambda conflict: lambda x, rng: rearrange_tiles(x, tile_permutation(view, conflict))


def _fixed(transform: Transform) -> Callable[[float], Transform]:
    return lambda conflict: transform


VIEWS: dict[str, Callable[[float], Transform]] = {
    "upright": _fixed(_identity),
    "tiles-a": _tiles("tiles-a"),
    "tiles-b": _tiles("tiles-b"),
    "tiles-c": _tiles("tiles-c"),
    "tiles-d": _tiles("tiles-d"),
    "rot90": _fixed(lambda x, rng: np.rot90(x, 1, axes=(1, 2))),
    "rot180": _fixed(lambda x, rng: np.rot90(x, 2, axes=(1, 2))),
    "rot270": _fixed(lambda x, rng: np.rot90(x, 3, axes=(1, 2))),
    "fliplr": _fixed(lambda x, rng: x[:, :, ::-1]),
    "flipud": _fixed(lambda x, rng: x[:, ::-1, :]),
    "transpose": _fixed(lambda x, rng: x.transpose(0, 2, 1)),
    "jigsaw": _fixed(_jigsaw),
}
"""Geometric transforms (given ``conflict``): the planted groups."""


def _styles(noise_std: float) -> dict[str, Transform]:
    return {
        "clean": _identity,
        "noisy": lambda x, rng: np.clip(x + rng.normal(0.0, noise_std, x.shape), 0.0, 1.0),
        "blurred": lambda x, rng: binomial_blur(x),
        "inverted": lambda x, rng: 1.0 - x,
        "edges": lambda x, rng: sobel_edges(x),
        "low-contrast": lambda x, rng: 0.3 + 0.4 * x,
    }


STYLES = tuple(_styles(0.0))
"""Photometric transforms: the decoy within-group variety."""


def _check_names(kind: str, chosen: Sequence[str], known: Sequence[str]) -> list[str]:
    chosen = [str(c) for c in chosen]
    unknown = [c for c in chosen if c not in known]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise TaeError(
            f"{kind} {chosen} must be distinct names from {list(known)}"
            + (f" (unknown: {unknown})" if unknown else "")
            + "."
        )
    return chosen


def _partition_train(
    pool: np.ndarray, labels: np.ndarray, num_domains: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split ``pool`` into ``num_domains`` disjoint parts, every class spread evenly."""
    parts: list[list[int]] = [[] for _ in range(num_domains)]
    offset = 0
    for label in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == label])
        chunks = np.array_split(members, num_domains)
        for d in range(num_domains):  # rotate who gets the larger chunks, class by class
            parts[(d + offset) % num_domains].extend(chunks[d].tolist())
        offset += len(members) % num_domains
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _stratified_take(
    indices: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` of ``indices`` with class shares kept (largest remainder), seeded."""
    classes, counts = np.unique(labels[indices], return_counts=True)
    exact = counts * n / len(indices)
    take = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    kept = [
        rng.permutation(indices[labels[indices] == c])[:k]
        for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(kept))


def make_digit_domains(
    views: Sequence[str] = ("upright", "tiles-a", "tiles-b", "tiles-c"),
    styles: Sequence[str] = ("clean", "noisy"),
    train_per_domain: int | None = None,
    conflict: float = 1.0,
    noise_std: float = 0.15,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> ImageDomains:
    """Real 8×8 digits in ``len(views) × len(styles)`` domains; the views are the planted groups.

    See the module docstring for what is planted and why.

    Args:
        views: geometric transforms, one planted group each (from :data:`VIEWS`).
        styles: photometric transforms, one domain per view each (from :data:`STYLES`).
        train_per_domain: training digits per domain (default: the domain's whole share of the
            training pool, ~135 for 8 domains); each domain's digits are its own.
        conflict: share of the 16 tiles a ``tiles-*`` view moves (1: all, 0: none, so those
            views are upright and the groups are planted in name only); other views ignore it.
        noise_std: standard deviation of the ``noisy`` style's Gaussian noise ([0, 1] scale).
        validation_fraction, test_fraction: held-out shares of the source digits (stratified
            by class); every domain sees all of them in its own view and style.
        seed: one seed for the splits, the partition and every random transform.

    Returns:
        :class:`ImageDomains` with domain names ``<view>-<style>`` (view-major order),
        ``task_groups`` = view index, ``path`` = ``sklearn-digits/<source index>``.
    """
    from datasets import Dataset
    from PIL import Image
    from sklearn.datasets import load_digits

    views = _check_names("views", views, list(VIEWS))
    styles = _check_names("styles", styles, STYLES)
    if not 0.0 <= conflict <= 1.0:
        raise TaeError(f"conflict must be in [0, 1], got {conflict!r}.")
    if noise_std < 0:
        raise TaeError(f"noise_std must be non-negative, got {noise_std!r}.")
    if not (validation_fraction > 0 and test_fraction > 0
            and validation_fraction + test_fraction < 1):  # fmt: skip
        raise TaeError(
            "validation_fraction and test_fraction must be positive and leave training digits, "
            f"got {validation_fraction} and {test_fraction}."
        )

    digits = load_digits()
    source = (digits.images / 16.0).astype(np.float64)
    labels = digits.target.astype(np.int64)
    pools = stratified_split(labels, [validation_fraction, test_fraction], seed)
    train_pool, val_pool, test_pool = (np.flatnonzero(pools == code) for code in range(3))
    pairs = [(view, style) for view in views for style in styles]
    names = [f"{view}-{style}" for view, style in pairs]
    parts = _partition_train(train_pool, labels, len(names), np.random.default_rng([seed, 1]))
    share = min(len(p) for p in parts)
    if train_per_domain is not None:
        if not 1 <= train_per_domain <= share:
            raise TaeError(
                f"train_per_domain={train_per_domain} is out of range: {len(names)} domains "
                f"share {len(train_pool)} training digits, at most {share} each; use fewer "
                "domains or a smaller validation_fraction/test_fraction."
            )
        take_rng = np.random.default_rng([seed, 2])
        parts = [_stratified_take(p, labels, train_per_domain, take_rng) for p in parts]

    style_fns = _styles(noise_std)
    rows: dict[str, list] = {"image": [], "labels": [], "task": [], "split": [], "path": []}
    for task, (view, style) in enumerate(pairs):
        rng = np.random.default_rng([seed, 3, task])
        for split, members in (
            ("train", parts[task]), ("validation", val_pool), ("test", test_pool),
        ):  # fmt: skip
            images = style_fns[style](VIEWS[view](conflict)(source[members], rng), rng)
            pixels = np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
            rows["image"].extend(Image.fromarray(p) for p in pixels)
            rows["labels"].extend(labels[members].tolist())
            rows["task"].extend([task] * len(members))
            rows["split"].extend([split] * len(members))
            rows["path"].extend(f"sklearn-digits/{i}" for i in members)

    dataset = Dataset.from_dict(rows, features=contract_features(
        [str(c) for c in range(10)], names, with_path=True))  # fmt: skip
    return ImageDomains(
        dataset=dataset,
        task_names=names,
        class_names=[str(c) for c in range(10)],
        task_groups=np.repeat(np.arange(len(views)), len(styles)),
        description=(
            f"scikit-learn 8x8 digits in {len(names)} domains = views {views} x styles {styles}; "
            f"planted groups = views (conflict {conflict}, "
            f"{train_per_domain or share} disjoint training digits per domain)"
        ),
        info={
            "source": "make_digit_domains",
            "views": views,
            "styles": styles,
            "train_per_domain": train_per_domain,
            "conflict": conflict,
            "noise_std": noise_std,
            "validation_fraction": validation_fraction,
            "test_fraction": test_fraction,
            "seed": seed,
            "num_channels": 1,
        },
    )
