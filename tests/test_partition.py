"""Choosing a partition by its predicted payoff: payoffs against a numpy closed form, the choice
rule against a brute-force reading of its definition, the k sweep's significance rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_estimation import NUM_TASKS, TASKS, make_store

from hf_tae.clustering import recommend_k, sweep_k
from hf_tae.errors import TaeError
from hf_tae.estimation import RegressionEstimator, choose_partition, partition_payoffs
from hf_tae.estimation.partition import best_nontrivial, labels_to_groups


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("partition")
    return [make_store(root / f"s{i}", train=40 + 10 * i)[0] for i in range(2)]


def _numpy_payoff(store, groups, l2):
    """Mean over tasks of the validation log-loss of the squared-loss ridge fit on each task's
    group, written out with numpy: w = (ΣZᵀZ + λI)⁻¹ ΣZᵀ(y − s)."""
    losses = []
    for group in groups:
        train = store.tensors("train", list(group))
        z = train["grad"].double().numpy()
        y = np.where(train["label"].numpy() > 0, 1.0, -1.0)
        s = train["score"].double().numpy()
        w = np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T @ (y - s))
        for task in group:
            val = store.tensors("validation", [task])
            margin = np.where(val["label"].numpy() > 0, 1.0, -1.0) * (
                val["score"].double().numpy() + val["grad"].double().numpy() @ w
            )
            losses.append(np.mean(np.logaddexp(0.0, -margin)))
    return float(np.mean(losses))


def test_payoffs_equal_a_numpy_ridge_per_group(stores):
    candidates = {
        "all": [TASKS],
        "pairs": [[0, 1], [2, 3], [4, 5]],
        "mixed": [["t5", "t0", "t2"], [1], [3, 4]],
        "single": [[t] for t in range(NUM_TASKS)],
    }
    estimators = [RegressionEstimator(s, loss="squared", l2=3.0) for s in stores]
    table = partition_payoffs(estimators, candidates, metric="log_loss")
    assert list(table.columns) == ["candidate", "member", "num_groups", "payoff"]
    assert len(table) == len(candidates) * len(stores)
    for row in table.itertuples():
        groups = [
            [TASKS.index(t) if isinstance(t, str) else t for t in g] for g in candidates[row.candidate]
        ]
        assert row.num_groups == len(groups)
        expected = _numpy_payoff(stores[row.member], groups, 3.0)
        assert row.payoff == pytest.approx(expected, rel=1e-6)


def _brute_force_choice(values, groups, structure, tolerance, higher):
    """The rule read literally: paired differences to the best mean, tied within tolerance
    standard errors, then most structure, then fewest groups."""
    names = list(values)
    util = {c: np.asarray(values[c]) * (1 if higher else -1) for c in names}
    best = max(names, key=lambda c: util[c].mean())
    tied = []
    for c in names:
        d = util[c] - util[best]
        se = d.std(ddof=1) / np.sqrt(len(d))
        if -d.mean() <= tolerance * se or c == best:
            tied.append(c)
    return sorted(tied, key=lambda c: (-structure.get(c, 0.0), groups[c]))[0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("higher", [True, False])
def test_choice_matches_brute_force(seed, higher):
    rng = np.random.default_rng(seed)
    names = ["all", "k2", "k3", "k4", "single"]
    groups = {"all": 1, "k2": 2, "k3": 3, "k4": 4, "single": 8}
    means = rng.normal(size=len(names)) * 0.05
    values = {c: m + rng.normal(size=5) * 0.05 for c, m in zip(names, means, strict=True)}
    structure = {"k2": float(rng.random()), "k3": float(rng.random() > 0.5), "k4": 0.0}
    payoffs = pd.DataFrame(
        [
            {"candidate": c, "member": i, "num_groups": groups[c], "payoff": v}
            for c in names
            for i, v in enumerate(values[c])
        ]
    )
    metric = "accuracy" if higher else "log_loss"
    summary = choose_partition(payoffs, metric, structure, tolerance=1.0)
    chosen = summary.loc[summary["chosen"], "candidate"].tolist()
    assert chosen == [_brute_force_choice(values, groups, structure, 1.0, higher)]
    best = max(names, key=lambda c: np.mean(values[c]) * (1 if higher else -1))
    assert summary.set_index("candidate").loc[best, "vs_best"] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_best_nontrivial_is_the_rule_without_the_trivial_candidates(seed):
    """best_nontrivial = the brute-force rule on the candidates other than all / single, even
    when a trivial candidate is far ahead; None when only trivial candidates exist."""
    rng = np.random.default_rng(seed)
    groups = {"all": 1, "k2": 2, "k3": 3, "single": 8}
    values = {c: rng.normal(size=4) * 0.05 for c in groups}
    values["all"] = values["all"] + 1.0  # the payoff rule's clear winner
    structure = {"k2": float(rng.random() > 0.5), "k3": float(rng.random())}
    payoffs = pd.DataFrame([{"candidate": c, "member": i, "num_groups": groups[c], "payoff": v}
                            for c in groups for i, v in enumerate(values[c])])  # fmt: skip
    trivial = ["all", "single"]
    assert choose_partition(payoffs, "accuracy", structure).set_index("candidate")[
        "chosen"].idxmax() == "all"  # fmt: skip
    rest = {c: v for c, v in values.items() if c not in trivial}
    expected = _brute_force_choice(rest, groups, structure, 1.0, higher=True)
    assert best_nontrivial(payoffs, trivial, "accuracy", structure) == expected
    only = payoffs[payoffs["candidate"].isin(trivial)]
    assert best_nontrivial(only, trivial, "accuracy") is None


def test_structure_breaks_ties_and_trivial_choices_win_without_it():
    def table(values):
        return pd.DataFrame(
            [
                {"candidate": c, "member": i, "num_groups": g, "payoff": v}
                for c, (g, vs) in values.items()
                for i, v in enumerate(vs)
            ]
        )

    # grouped is tied with single tasks (the best) and structured: grouped wins
    payoffs = table({"all": (1, [0.50, 0.52, 0.51]), "grouped": (3, [0.40, 0.43, 0.39]),
                     "single": (8, [0.39, 0.42, 0.40])})  # fmt: skip
    summary = choose_partition(payoffs, "log_loss", {"grouped": 0.3}).set_index("candidate")
    assert summary["chosen"].idxmax() == "grouped"
    assert summary.loc["all", "tied"] == np.False_
    # same payoffs, no structure anywhere: the fewest groups among the tied (grouped, k=3)
    summary = choose_partition(payoffs, "log_loss", {}).set_index("candidate")
    assert summary["chosen"].idxmax() == "grouped"
    # grouping clearly worse than single tasks: single tasks, structure or not
    payoffs = table({"all": (1, [0.50, 0.52, 0.51]), "grouped": (3, [0.45, 0.47, 0.46]),
                     "single": (8, [0.39, 0.42, 0.40])})  # fmt: skip
    summary = choose_partition(payoffs, "log_loss", {"grouped": 5.0}).set_index("candidate")
    assert summary["chosen"].idxmax() == "single"
    # one member: no standard error, the best payoff alone
    one = payoffs[payoffs["member"] == 0]
    summary = choose_partition(one, "log_loss", {"grouped": 5.0}).set_index("candidate")
    assert summary["chosen"].idxmax() == "single" and summary["vs_best_se"].isna().all()


def test_labels_to_groups():
    assert labels_to_groups([2, 0, 2, 1, 0]) == [[0, 2], [1, 4], [3]]


def test_sweep_recommends_one_group_on_structureless_matrices():
    picked = []
    for seed in range(10):
        A = np.random.default_rng(seed).standard_normal((12, 12))
        sweep = sweep_k((A + A.T) / 2, range(1, 7), seed=seed)
        # the rule, read off the table: gains outside the null's spread only
        significant = sweep["gain"] > 2 * sweep["null_std"]
        assert (sweep["significant"] == (significant & (sweep["k"] > 1))).all()
        picked.append(recommend_k(sweep))
    assert picked.count(1) >= 8  # at most a chance false alarm or two at 2 standard deviations


def test_bad_inputs(stores):
    est = RegressionEstimator(stores[0], loss="squared", l2=3.0)
    with pytest.raises(TaeError, match=r"not a partition.*\['t1'\] appear in several groups"):
        partition_payoffs([est], {"bad": [[0, 1], [1, 2, 3, 4, 5]]})
    with pytest.raises(TaeError, match=r"\['t5'\] are in no group"):
        partition_payoffs([est], {"bad": [[0, 1, 2, 3, 4]]})
    with pytest.raises(TaeError, match="unknown task 'x9'"):
        partition_payoffs([est], {"bad": [["x9"], list(range(6))]})
    with pytest.raises(TaeError, match="no estimators"):
        partition_payoffs([], {"all": [TASKS]})
    with pytest.raises(TaeError, match="metric"):
        partition_payoffs([est], {"all": [TASKS]}, metric="auc")
    payoffs = partition_payoffs([est], {"all": [TASKS]})
    with pytest.raises(TaeError, match="unknown candidates"):
        choose_partition(payoffs, "log_loss", {"k9": 1.0})
    with pytest.raises(TaeError, match="tolerance"):
        choose_partition(payoffs, "log_loss", tolerance=-1)
    with pytest.raises(TaeError, match="partition_payoffs"):
        choose_partition(pd.DataFrame(), "log_loss")
    with pytest.raises(TaeError, match="at least 2 shuffled nulls"):
        sweep_k(np.eye(4), null_draws=1)
