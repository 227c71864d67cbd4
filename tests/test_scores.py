"""Score functions against closed forms computed independently in float64."""

import numpy as np
import pytest
import torch

from hf_tae.models.scores import GoldLogOddsScore, TaskLogitScore, TokenLogOddsScore, gold_log_odds


def _log_odds_reference(logits: np.ndarray, gold: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    pg = np.take_along_axis(p, gold[..., None], -1)[..., 0]
    return np.log(pg / (1 - pg))


def test_gold_log_odds_equals_log_p_over_one_minus_p():
    torch.manual_seed(0)
    logits = torch.randn(7, 5, dtype=torch.float64) * 3
    gold = torch.randint(0, 5, (7,))
    expected = _log_odds_reference(logits.numpy(), gold.numpy())
    np.testing.assert_allclose(gold_log_odds(logits, gold).numpy(), expected, rtol=1e-10)
    out = GoldLogOddsScore()({"logits": logits}, {"labels": gold})
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10)


def test_log_odds_stay_finite_where_p_rounds_to_one_and_clamp_is_explicit():
    logits = torch.tensor([[60.0, 0.0, 0.0]])  # p_gold = 1 - 2e-26: log(p/(1-p)) is inf in float32
    assert torch.isfinite(gold_log_odds(logits, torch.tensor([0]))).all()
    assert gold_log_odds(logits, torch.tensor([0])).item() == pytest.approx(
        60.0 - np.log(2.0), rel=1e-6
    )
    clamped = GoldLogOddsScore(clamp=5.0)({"logits": logits}, {"labels": torch.tensor([0])})
    assert clamped.item() == 5.0
    with pytest.raises(ValueError, match="clamp"):
        GoldLogOddsScore(clamp=0.0)


def test_task_logit_picks_each_examples_own_task():
    logits = torch.arange(12.0).view(4, 3)
    out = TaskLogitScore()({"logits": logits}, {"task": torch.tensor([2, 0, 1, 2])})
    assert out.tolist() == [2.0, 3.0, 7.0, 11.0]
    with pytest.raises(ValueError, match="task"):
        TaskLogitScore()({"logits": logits}, {})


def test_token_log_odds_causal_shift_mean_and_first_token():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 4, 1, -100], [-100, -100, 6, 2, 0]])
    ref = np.zeros(2)
    ref_first = np.zeros(2)
    for b in range(2):
        vals = [
            _log_odds_reference(logits[b, t - 1].numpy()[None], np.array([labels[b, t].item()]))[0]
            for t in range(1, 5)
            if labels[b, t] != -100
        ]
        ref[b], ref_first[b] = np.mean(vals), vals[0]
    causal = TokenLogOddsScore(shift=True)({"logits": logits}, {"labels": labels})
    np.testing.assert_allclose(causal.numpy(), ref, rtol=1e-10)
    first = TokenLogOddsScore(shift=True, first_token=True)({"logits": logits}, {"labels": labels})
    np.testing.assert_allclose(first.numpy(), ref_first, rtol=1e-10)


def test_token_log_odds_for_seq2seq_has_no_shift_and_rejects_empty_targets():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                                decoder_start_token_id=0))  # fmt: skip
    score = TokenLogOddsScore.for_model(model)
    assert score.shift is False and score.config()["name"] == "token_log_odds"
    logits = torch.randn(1, 3, 20, dtype=torch.float64)
    labels = torch.tensor([[4, -100, 9]])
    ref = np.mean(
        [
            _log_odds_reference(logits[0, t].numpy()[None], np.array([labels[0, t].item()]))[0]
            for t in (0, 2)
        ]
    )
    assert score({"logits": logits}, {"labels": labels}).item() == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="no target token"):
        score({"logits": logits}, {"labels": torch.full((1, 3), -100)})
