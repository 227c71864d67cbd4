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


def test_corrected_spearman_above_one_is_flagged():
    text = render_report({**BASE, "ground_truth": _truth(1.02)})
    assert "+1.02 (above 1: too few seeds" in text


def test_single_seed_truth_has_no_noise_line():
    truth = _truth(0.9)
    for key in ("truth_self_agreement", "estimate_self_agreement", "corrected_spearman"):
        truth.pop(key)
    assert "Both sides are noisy" not in render_report({**BASE, "ground_truth": truth})
