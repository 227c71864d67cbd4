"""The planted selection benchmarks against scikit-learn's digits: every source's labels and
pixels are what its role says (copies, wrong labels, swapped classes, fresh handwriting)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from hf_tae.errors import TaeError
from hf_tae.selection.planted import ROLE_CODES, VARIANT_ROLES, make_selection_domains

#: The swapped pairs of ``swapped-noisy``, written out by hand.
PAIRS = {1: 7, 7: 1, 3: 8, 8: 3, 4: 9, 9: 4, 5: 6, 6: 5}


@pytest.fixture(scope="module")
def lookalikes():
    domains = make_selection_domains(variant="lookalikes")
    table = domains.dataset.to_dict()
    digits = load_digits()
    source = np.array([int(p.split("/")[1]) for p in table["path"]])
    return domains, table, source, digits


def _rows(domains, table, name, split="train"):
    task = domains.task_names.index(name)
    return np.flatnonzero((np.array(table["task"]) == task) & (np.array(table["split"]) == split))


def _pixels(table, rows):
    return np.stack([np.asarray(Image.open(io.BytesIO(table["image"][i]["bytes"])), dtype=float)
                     for i in rows]) / 255.0  # fmt: skip


def test_lookalike_roles_and_labels_against_the_source_digits(lookalikes):
    domains, table, source, digits = lookalikes
    assert domains.task_names == list(VARIANT_ROLES["lookalikes"])
    roles = VARIANT_ROLES["lookalikes"]
    assert domains.task_groups.tolist() == [ROLE_CODES[roles[n]] for n in domains.task_names]
    labels = np.array(table["labels"])
    truth = digits.target[source]
    for name in ("target", "helpful-clean", "helpful-noisy", "copies-1", "copies-2",
                 "offview-clean"):  # fmt: skip
        rows = _rows(domains, table, name)
        assert (labels[rows] == truth[rows]).all(), name
    wrong = _rows(domains, table, "mislabelled-clean")
    assert len(wrong) == 120 and (labels[wrong] != truth[wrong]).all()
    assert len(set(labels[wrong])) == 10  # wrong classes drawn over all of them
    swapped = _rows(domains, table, "swapped-noisy")
    expected = np.array([PAIRS.get(int(y), int(y)) for y in truth[swapped]])
    assert (labels[swapped] == expected).all()
    assert np.isin(truth[swapped], [0, 2]).any()  # the two unswapped classes are there too
    for name in domains.task_names:  # held-out rows keep their true labels
        for split in ("validation", "test"):
            rows = _rows(domains, table, name, split)
            assert len(rows) > 0 and (labels[rows] == truth[rows]).all(), (name, split)


def test_copies_repeat_the_target_digits_with_light_noise(lookalikes):
    domains, table, source, digits = lookalikes
    target = _rows(domains, table, "target")
    clean = np.round(digits.images[source[target]] / 16.0 * 255) / 255.0
    assert np.abs(_pixels(table, target) - clean).max() < 1e-9  # the target is the clean digit
    draws = []
    for name in ("copies-1", "copies-2"):
        rows = _rows(domains, table, name)
        assert source[rows].tolist() == np.repeat(source[target], 4).tolist()
        diff = _pixels(table, rows) - np.repeat(clean, 4, axis=0)
        # Gaussian noise of sd 0.05, clipped to [0, 1]: small, not zero, about half clipped away
        assert 0.01 < diff.std() < 0.05 and np.abs(diff).max() < 0.35
        draws.append(diff)
    assert not np.allclose(draws[0], draws[1])  # each copy has its own noise


def test_fresh_sources_bring_their_own_handwriting(lookalikes):
    domains, table, source, _ = lookalikes
    fresh = ("target", "helpful-clean", "helpful-noisy", "mislabelled-clean", "swapped-noisy",
             "offview-clean")  # fmt: skip
    seen: set[int] = set()
    for name in fresh:
        digits = set(source[_rows(domains, table, name)].tolist())
        assert not digits & seen, name
        seen |= digits


def test_default_variant_and_bad_variant():
    with pytest.raises(TaeError, match="variant='copies'"):
        make_selection_domains(variant="copies")
    domains = make_selection_domains(target_train=10)
    assert domains.task_names == list(VARIANT_ROLES["sources"])
    assert domains.info["variant"] == "sources"
