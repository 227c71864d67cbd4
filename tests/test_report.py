"""The run report states what results.json holds, including how noisy both sides are."""

from __future__ import annotations

from hf_tae.pipeline.report import render_report

BASE = {
    "family": "graph",
    "data": "planted (16 tasks)",
    "command": "hf-tae run",
    "metrics": {
        "selection": "f1",
        "affinity": "log_loss",
        "labels": {"f1": "F1", "accuracy": "accuracy", "log_loss": "BCE"},
    },
    "world_size": 1,
    "timings": {"ground truth": 100.0},
    "meta_init": {"test_avg": 0.9, "baseline_avg": 0.1},
}


def _truth(corrected: float) -> dict:
    agreement = {"num_repeats": 2, "mean_spearman": 0.5, "reliability": 2 * 0.5 / 1.5}
    return {
        "num_subsets": 20,
        "seconds": 100.0,
        "compute_ratio": 0.001,
        "affinity": {"relative_frobenius": 0.9, "mean_abs_error": 0.5, "spearman": 0.6,
                     "pearson": 0.6},
        "scores": {"mean_abs_error": 0.02, "spearman": 0.5, "pearson": 0.4},
        "truth_self_agreement": agreement,
        "estimate_self_agreement": {**agreement, "num_repeats": 6, "mean_spearman": 0.3,
                                    "reliability": 6 * 0.3 / 2.5},
        "corrected_spearman": corrected,
    }  # fmt: skip


def test_ground_truth_section_states_both_sides_noise():
    text = render_report({**BASE, "ground_truth": _truth(0.87)})
    assert "2 fine-tuning seeds agree with each other at Spearman +0.50" in text
    assert "(reliability of their mean 0.67)" in text
    assert "6 meta-initializations agree with each other at Spearman +0.30" in text
    assert "(reliability of their mean 0.72)" in text
    assert "the Spearman of the affinity entries is +0.87." in text
    assert "| affinity entries | 0.9" in text


def test_ground_truth_section_says_where_the_truth_started():
    text = render_report({**BASE, "ground_truth": {**_truth(0.5), "init": "members"}})
    assert "repeat r fine-tuned from meta-initialization r (what the estimate linearizes)" in text
    assert "2 fine-tuning runs (each from its own θ0) agree with each other" in text
    text = render_report({**BASE, "ground_truth": {**_truth(0.5), "init": "group"}})
    assert "fine-tuned for real, started as the group models are (--group_init): " in text
    assert "2 fine-tuning seeds agree" in text


def test_exhaustive_truth_with_too_many_partitions_says_none_were_ranked():
    from hf_tae.pipeline.report import _exhaustive_lines

    truth = {"subset_size": 2, "num_subsets": 120, "seeds": 2, "seconds": 60.0,
             "metric": "log_loss", "affinity": {"spearman": 0.5, "pearson": 0.4,
                                                "relative_frobenius": 0.9, "mean_abs_error": 0.1,
                                                "num_entries": 240},
             "chosen": {"k": 4, "true_objective": 1.0}, "by_k": None, "note": None,
             "partitions": {"scorable": 2027025, "top": [],
                            "note": "2027025 partitions of the 16 tasks into fine-tuned subsets "
                                    "of 2: more than 1000000 to rank, so none are ranked"}}  # fmt: skip
    text = "\n".join(_exhaustive_lines(truth))
    assert "2027025 partitions of the 16 tasks" in text and "none are ranked." in text


def test_ground_truth_section_clusters_the_truth_itself():
    groups = [{"k": 2, "groups": [["a", "b"], ["c", "d"]], "ari_vs_chosen": 1.0,
               "ari_vs_planted": None}]  # fmt: skip
    text = render_report({**BASE, "ground_truth": {**_truth(0.5), "truth_groups": groups}})
    assert ("The fine-tuned affinity itself, clustered as the estimate is (SDP, k = 2): {a, b}; "
            "{c, d} (ARI 1.00 against the job's groups).") in text  # fmt: skip


def test_ground_truth_cost_counts_only_the_runs_trained_in_this_call():
    reused = {**_truth(0.5), "runs": 200, "runs_trained": 0, "seconds": 0.4, "compute_ratio": None}
    assert "for real: all 200 runs reused from an earlier call of the job." in render_report(
        {**BASE, "ground_truth": reused})
    partial = {**_truth(0.5), "runs": 200, "runs_trained": 50, "seconds": 800.0,
               "compute_ratio": 0.002}  # fmt: skip
    assert ("for real: 800 s for 50 of the 200 runs, the rest reused; estimation took 0.2% of "
            "the time all runs take.") in render_report({**BASE, "ground_truth": partial})  # fmt: skip


def test_corrected_spearman_above_one_is_flagged():
    text = render_report({**BASE, "ground_truth": _truth(1.02)})
    assert "+1.02 (above 1: too few seeds" in text


def test_single_seed_truth_has_no_noise_line():
    truth = _truth(0.9)
    for key in ("truth_self_agreement", "estimate_self_agreement", "corrected_spearman"):
        truth.pop(key)
    assert "Both sides are noisy" not in render_report({**BASE, "ground_truth": truth})


def _grouped_run(planted: bool) -> dict:
    """A results dict through grouping and group training, with or without planted groups."""
    scores = {"f1": 0.5, "accuracy": 0.8, "log_loss": 0.4, "num_models": 1}
    results = {
        **BASE,
        "data": "CommunityGraph(name='snap-com-toy-top4', nodes=200, edges=900, tasks=4)",
        "estimation": {"num_subsets": 6, "subset_size": 2, "num_meta_inits": 1,
                       "estimator": "paper", "scoring_split": "validation", "metric": "log_loss",
                       "subsets_per_second": 100.0},
        "grouping": {"method": "sdp", "k": 2, "k_choice": "given", "objective": 0.4,
                     "groups": [["a", "b"], ["c", "d"]], "labels": [0, 0, 1, 1], "sweep": None},
        "group_training": {"init": "from scratch", "seeds": 1, "split": "test", "metric": "f1",
                           "summary": {"grouped": {**scores, "num_models": 2, "wins": 2},
                                       "all tasks": scores},
                           "per_task": {t: {"grouped": 0.6, "all tasks": 0.5} for t in "abcd"}},
    }  # fmt: skip
    if planted:
        results["estimation"]["planted_gap"] = 0.25
        results["grouping"]["adjusted_rand_vs_planted"] = 1.0
        results["group_training"]["summary"]["planted groups"] = {**scores, "num_models": 2}
        for t in "abcd":
            results["group_training"]["per_task"][t]["planted groups"] = 0.7
    return results


def test_report_without_planted_groups_has_no_planted_row_ari_or_nan(tmp_path):
    from hf_tae.pipeline.report import write_report

    text = write_report(_grouped_run(planted=False), tmp_path).read_text()
    assert "## Group training" in text and "| grouped | 2 | 0.500" in text
    assert "planted" not in text.lower() and "adjusted rand" not in text.lower()
    assert "nan" not in text.lower()
    # the same run with planted groups reports all three
    text = render_report(_grouped_run(planted=True))
    assert "| planted groups | 2 |" in text
    assert "Adjusted Rand index against the planted groups: 1.000" in text
    assert "affinity of the planted groups: +0.250" in text


def test_report_never_prints_nan():
    """Undefined numbers (NaN from constant inputs, or results.json nulls) read "n/a" or "—"."""
    nan = float("nan")
    results = _grouped_run(planted=True)
    results["estimation"]["planted_gap"] = nan
    results["grouping"]["adjusted_rand_vs_planted"] = None
    results["estimation"]["self_agreement"] = {"num_repeats": 2, "mean_spearman": nan,
                                               "reliability": nan}  # fmt: skip
    results["group_training"]["per_task"]["a"]["grouped"] = nan
    truth = _truth(nan)
    truth["affinity"]["spearman"] = nan
    truth["truth_self_agreement"]["mean_spearman"] = nan
    text = render_report({**results, "ground_truth": truth})
    assert "nan" not in text.lower()
    assert "planted groups:" not in text and "Adjusted Rand" not in text
    assert "Spearman n/a on average" in text and "| a | — | 0.500 | 0.700 |" in text
    assert "Corrected for that noise" not in text


def test_sweep_shows_each_meta_initializations_silhouettes_and_whether_they_agree_on_k():
    results = _grouped_run(planted=False)
    row = {"objective": 1.0, "null_objective": 0.9, "gain": 0.1, "significant": True}
    results["grouping"]["sweep"] = [
        {**row, "k": 2, "silhouette": 0.30, "silhouette_members": [0.40, 0.20],
         "preferred_by_members": 1},
        {**row, "k": 3, "silhouette": 0.31, "silhouette_members": [0.35, None],
         "preferred_by_members": 1},
    ]  # fmt: skip
    results["grouping"]["silhouette_k_votes"] = {"k": 3, "best_on": 1, "meta_inits": 2}
    text = render_report(results)
    assert "| silhouette per meta-initialization | best on |" in text
    assert "| 3 | 1.0000 | 0.9000 | 0.1000 | True | 0.3100 | 0.3500 / n/a | 1 |" in text
    assert "(k = 3) is the best on 1 of 2: the members split this near tie, so the choice" in text
    results["grouping"]["silhouette_k_votes"]["best_on"] = 0
    assert "is the best on 0 of 2: no member's own affinity picks it, so" in render_report(results)
    results["grouping"]["silhouette_k_votes"]["best_on"] = 2
    text = render_report(results)
    assert "is the best on 2 of 2." in text and "fragile" not in text


def test_report_lists_each_groups_coherence_and_which_were_split():
    results = _grouped_run(planted=False)
    results["grouping"]["coherence"] = {
        "kept": [{"tasks": ["a", "b"], "coherence": 0.41, "coherence_std": 0.05}],
        "split": [{"tasks": ["c", "d"], "coherence": -0.1, "coherence_std": None}],
    }
    text = render_report(results)
    assert "| a, b | 0.410 ± 0.050 |  |" in text
    assert "| c, d | -0.100 ± n/a | **yes** |" in text
    assert "`--split_incoherent_groups`" in text
    results["grouping"]["coherence"] = None  # --partition_choice payoff / density, or k given
    assert "Coherence of the best-silhouette" not in render_report(results)


def test_report_says_the_meta_initialization_was_widened():
    widening = {"tried": [{"capacity": {"--hidden_size": 8}, "test_avg": 0.101},
                          {"capacity": {"--hidden_size": 16}, "test_avg": 0.11}],
                "kept": {"capacity": {"--hidden_size": 32}, "test_avg": 0.66}}  # fmt: skip
    text = render_report({**BASE, "meta_init": {**BASE["meta_init"], "widening": widening}})
    assert ("no better than the baseline with --hidden_size 8: 0.101; --hidden_size 16: 0.110, "
            "so it was retrained twice as wide") in text
    assert "(--hidden_size 32) is used for the gradients" in text
    assert "retrained twice as wide" not in render_report(BASE)


def test_report_names_the_groups_validation_split():
    results = _grouped_run(planted=False)
    results["group_training"]["validated_groups"] = [["a", "b"], ["c"], ["d"]]
    text = render_report(results)
    assert "Validated groups: the estimate's groups, except that {c, d} scored better" in text
    results["group_training"]["validated_groups"] = None
    assert "Validated groups" not in render_report(results)
