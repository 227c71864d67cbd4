"""The embedded data-selection benchmarks: digits sources that help, hurt, or only look alike.

One target domain with few training digits (``target``, upright clean digits, 30 by default)
and candidate sources carved from the digits domains of :func:`~hf_tae.make_digit_domains`
(views ``upright`` and ``tiles-a``, styles ``clean`` and ``noisy``), each with its own disjoint
handwriting unless said otherwise. Two variants (``variant=``):

``"sources"`` (the default benchmark)
    * **helpful**: more upright digits, clean (two sources) or noisy (one): the target's own
      distribution or close to it;
    * **mislabelled** (harmful): upright noisy digits whose labels are replaced by a uniformly
      drawn *wrong* class: with the shared head of the benchmark's model they teach the
      opposite of what the target needs;
    * **off-view**: digits of the ``tiles-a`` view (every 2×2 tile moved), correctly labelled
      (``offview-clean``, ``offview-noisy``) or mislabelled (``offview-mislabelled``): other
      data that competes for the tiny backbone.

``"lookalikes"`` (the harder variant: sources that *look* like the target to a similarity
measure but do not help it)
    * **helpful**: upright digits, clean (``helpful-clean``) and noisy (``helpful-noisy``);
    * **copies** (redundant): near-copies of the target's own 30 training digits (each 4 times,
      with light pixel noise, std 0.05): the most target-like data there is, to the pixel and to
      the gradient, yet nothing new (scraped duplicates of a benchmark);
    * **mislabelled-clean** (harmful): fresh upright clean digits with uniformly wrong labels:
      the target's inputs exactly, so representation similarity cannot tell them apart;
    * **swapped-noisy** (harmful): upright noisy digits with four confusable pairs of classes
      swapped (1↔7, 3↔8, 4↔9, 5↔6): two classes in ten keep their label, so the mean gradient
      still leans the target's way on most classes;
    * **offview-clean** (off-view), as above.

Whether each source really helps or hurts is checked by real training in
``benchmarks/selection.py`` (the target alone against the target plus each source), so the
planting is measured, not assumed. Every domain keeps validation and test rows (the shared
held-out digits in its own base view and style; correct labels), so every run is scored the
same way.
"""

from __future__ import annotations

import io

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.image.domains import ImageDomains, contract_features

#: Planted role of every domain of :func:`make_selection_domains`, per variant, in order.
VARIANT_ROLES = {
    "sources": {
        "target": "target",
        "helpful-clean-1": "helpful",
        "helpful-clean-2": "helpful",
        "helpful-noisy": "helpful",
        "mislabelled-upright": "harmful",
        "offview-clean": "off-view",
        "offview-noisy": "off-view",
        "offview-mislabelled": "harmful",
    },
    "lookalikes": {
        "target": "target",
        "helpful-clean": "helpful",
        "helpful-noisy": "helpful",
        "copies-1": "redundant",
        "copies-2": "redundant",
        "mislabelled-clean": "harmful",
        "swapped-noisy": "harmful",
        "offview-clean": "off-view",
    },
}
#: Roles of the default variant (kept as the benchmark's reference table).
ROLES = VARIANT_ROLES["sources"]
#: Codes of the roles in ``task_groups``.
ROLE_CODES = {"target": 0, "helpful": 1, "harmful": 2, "off-view": 3, "redundant": 4}
#: The class swap of ``swapped-noisy``: confusable pairs of digits exchange labels.
SWAP = np.array([0, 7, 2, 8, 9, 6, 5, 1, 3, 4])
#: Copies of each target digit in a ``copies-*`` source, and their pixel noise.
COPIES, COPY_NOISE = 4, 0.05


def make_selection_domains(target_train: int = 30, seed: int = 0,
                           variant: str = "sources") -> ImageDomains:  # fmt: skip
    """A planted selection benchmark as :class:`~hf_tae.ImageDomains` (see module docstring);
    ``task_groups`` codes the roles (:data:`ROLE_CODES`)."""
    from datasets import Dataset

    from hf_tae.families.image.digits import make_digit_domains

    if variant not in VARIANT_ROLES:
        raise TaeError(f"variant={variant!r}; give one of {sorted(VARIANT_ROLES)}.")
    base = make_digit_domains(("upright", "tiles-a"), ("clean", "noisy"), seed=seed)
    data = base.dataset.to_dict()
    task = np.asarray(data["task"])
    split = np.asarray(data["split"])
    labels = np.asarray(data["labels"])
    rng = np.random.default_rng([seed, 7])
    halves = {b: np.flatnonzero((task == b) & (split == "train")) for b in range(4)}
    if not 1 <= target_train < len(halves[0]) - 2:
        raise TaeError(f"target_train={target_train}; give 1..{len(halves[0]) - 3}.")
    target, rest = halves[0][:target_train], halves[0][target_train:]
    # rows of each new domain: (base domain, its training rows, how their labels/pixels change)
    if variant == "sources":
        plan = [(0, target, None), (0, rest[: len(rest) // 2], None),
                (0, rest[len(rest) // 2 :], None), (1, halves[1][: len(halves[1]) // 2], None),
                (1, halves[1][len(halves[1]) // 2 :], "wrong"), (2, halves[2], None),
                (3, halves[3][: len(halves[3]) // 2], None),
                (3, halves[3][len(halves[3]) // 2 :], "wrong")]  # fmt: skip
    else:
        plan = [(0, target, None), (0, rest[: len(rest) // 2], None),
                (1, halves[1][: len(halves[1]) // 2], None), (0, target, "copies"),
                (0, target, "copies"), (0, rest[len(rest) // 2 :], "wrong"),
                (1, halves[1][len(halves[1]) // 2 :], "swap"), (2, halves[2], None)]  # fmt: skip
    names = list(VARIANT_ROLES[variant])
    rows: dict[str, list] = {k: [] for k in ("image", "labels", "task", "split", "path")}
    for new, (b, train_rows, change) in enumerate(plan):
        held_out = np.flatnonzero((task == b) & (split != "train"))
        for part, how in ((train_rows, change), (held_out, None)):
            images = [data["image"][i] for i in part]
            y = labels[part]
            if how == "copies":
                part = np.repeat(part, COPIES)
                images = _noisy_copies(images, COPIES, COPY_NOISE, rng)
                y = labels[part]
            elif how == "wrong":  # a uniformly drawn wrong class for every row
                y = (y + rng.integers(1, 10, size=len(y))) % 10
            elif how == "swap":
                y = SWAP[y]
            rows["image"] += images
            rows["labels"] += y.tolist()
            rows["task"] += [new] * len(part)
            rows["split"] += split[part].tolist()
            rows["path"] += [data["path"][i] for i in part]
    features = contract_features(base.class_names, names, with_path=True)
    roles = VARIANT_ROLES[variant]
    return ImageDomains(
        dataset=Dataset.from_dict(rows, features=features),
        task_names=names,
        class_names=base.class_names,
        task_groups=np.asarray([ROLE_CODES[roles[n]] for n in names]),
        description=(
            f"data-selection benchmark ({variant}): target upright-clean with {target_train} "
            "training digits; " + ", ".join(sorted(set(roles.values()) - {"target"}))
            + " sources from the digits domains"
        ),
        info={
            "source": "make_selection_domains",
            "variant": variant,
            "target_train": target_train,
            "seed": seed,
            "roles": roles,
            "num_channels": 1,
        },  # fmt: skip
    )


def _noisy_copies(images: list, copies: int, std: float, rng: np.random.Generator) -> list:
    """``copies`` near-copies of every image (stored PNG dicts), each with its own Gaussian
    pixel noise of ``std`` on the [0, 1] scale; copies of one image are adjacent."""
    from PIL import Image

    out = []
    for image in images:
        pixels = np.asarray(Image.open(io.BytesIO(image["bytes"])), dtype=np.float64) / 255.0
        for _ in range(copies):
            noisy = np.clip(pixels + rng.normal(0.0, std, pixels.shape), 0.0, 1.0)
            out.append(Image.fromarray(np.round(noisy * 255).astype(np.uint8)))
    return out
