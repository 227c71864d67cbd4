"""The embedded data-selection benchmark: digits sources that help, hurt, or come from elsewhere.

One target domain with few training digits (``upright-clean``, 30 by default) and candidate
sources carved from the digits domains of :func:`~hf_tae.make_digit_domains` (views
``upright`` and ``tiles-a``, styles ``clean`` and ``noisy``), each with its own disjoint
handwriting:

* **helpful**: more upright digits, clean (two sources) or noisy (one): the target's own
  distribution or close to it;
* **mislabelled** (harmful): upright noisy digits whose labels are replaced by a uniformly
  drawn *wrong* class: with the shared head of the benchmark's model they teach the opposite
  of what the target needs;
* **off-view**: digits of the ``tiles-a`` view (every 2×2 tile moved), correctly labelled
  (``offview-clean``, ``offview-noisy``) or mislabelled (``offview-mislabelled``): other data
  that competes for the tiny backbone.

Whether each source really helps or hurts is checked by real training in
``benchmarks/selection.py`` (the target alone against the target plus each source), so the
planting is measured, not assumed. Every domain keeps validation and test rows (the shared
held-out digits in its own view and style; correct labels), so every run is scored the same way.
"""

from __future__ import annotations

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.image.domains import ImageDomains, contract_features

#: Planted role of every domain of :func:`make_selection_domains`, in order.
ROLES = {
    "target": "target",
    "helpful-clean-1": "helpful",
    "helpful-clean-2": "helpful",
    "helpful-noisy": "helpful",
    "mislabelled-upright": "harmful",
    "offview-clean": "off-view",
    "offview-noisy": "off-view",
    "offview-mislabelled": "harmful",
}


def make_selection_domains(target_train: int = 30, seed: int = 0) -> ImageDomains:
    """The planted selection benchmark as :class:`~hf_tae.ImageDomains` (see module docstring);
    ``task_groups`` codes the roles (0 target, 1 helpful, 2 harmful, 3 off-view)."""
    from datasets import Dataset

    from hf_tae.families.image.digits import make_digit_domains

    base = make_digit_domains(("upright", "tiles-a"), ("clean", "noisy"), seed=seed)
    data = base.dataset.to_dict()
    task = np.asarray(data["task"])
    split = np.asarray(data["split"])
    labels = np.asarray(data["labels"])
    rng = np.random.default_rng([seed, 7])
    names = list(ROLES)
    # rows of each new domain: (base domain, part of its training rows, mislabel?)
    halves = {b: np.flatnonzero((task == b) & (split == "train")) for b in range(4)}
    if not 1 <= target_train < len(halves[0]) - 2:
        raise TaeError(f"target_train={target_train}; give 1..{len(halves[0]) - 3}.")
    clean_rest = halves[0][target_train:]
    plan = [
        (0, halves[0][:target_train], False),
        (0, clean_rest[: len(clean_rest) // 2], False),
        (0, clean_rest[len(clean_rest) // 2 :], False),
        (1, halves[1][: len(halves[1]) // 2], False),
        (1, halves[1][len(halves[1]) // 2 :], True),
        (2, halves[2], False),
        (3, halves[3][: len(halves[3]) // 2], False),
        (3, halves[3][len(halves[3]) // 2 :], True),
    ]
    rows: dict[str, list] = {k: [] for k in ("image", "labels", "task", "split", "path")}
    for new, (b, train_rows, mislabel) in enumerate(plan):
        held_out = np.flatnonzero((task == b) & (split != "train"))
        for part, wrong in ((train_rows, mislabel), (held_out, False)):
            y = labels[part]
            if wrong:  # a uniformly drawn wrong class for every row
                y = (y + rng.integers(1, 10, size=len(y))) % 10
            rows["image"] += [data["image"][i] for i in part]
            rows["labels"] += y.tolist()
            rows["task"] += [new] * len(part)
            rows["split"] += split[part].tolist()
            rows["path"] += [data["path"][i] for i in part]
    features = contract_features(base.class_names, names, with_path=True)
    codes = {"target": 0, "helpful": 1, "harmful": 2, "off-view": 3}
    return ImageDomains(
        dataset=Dataset.from_dict(rows, features=features),
        task_names=names,
        class_names=base.class_names,
        task_groups=np.asarray([codes[ROLES[n]] for n in names]),
        description=(
            f"data-selection benchmark: target upright-clean with {target_train} training "
            "digits; helpful, mislabelled and off-view sources from the digits domains"
        ),
        info={
            "source": "make_selection_domains",
            "target_train": target_train,
            "seed": seed,
            "roles": ROLES,
            "num_channels": 1,
        },  # fmt: skip
    )
