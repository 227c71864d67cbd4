"""A.7 first-order check against independent references: a model linear in its parameters
(zero first-order error), per-example autograd and finite differences for ∇s·Δ, the quadratic
decay of the error, exact restoration of θ0, and bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hf_tae import SignConfig, SignForMultiTaskNodeClassification, TaeError
from hf_tae.evaluation.first_order import (
    COLUMNS,
    DEFAULT_NORMS,
    first_order_check,
    parameter_delta,
    score_jvp,
)
from hf_tae.models.scores import TaskLogitScore

IN = 3 * 6  # tiny_graph with num_hops=2: hop_features [batch, 3, 6]


class LinearInParams(nn.Module):
    """logits = W x + b: exactly linear in (W, b), so the linearization is exact."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.lin = nn.Linear(IN, num_tasks, dtype=torch.float64)

    def forward(self, hop_features, **kwargs):
        return {"logits": self.lin(hop_features.flatten(1).double())}


class TanhMLP(nn.Module):
    """A smooth nonlinear model (float64), so the first-order error decays quadratically."""

    def __init__(self, num_tasks: int, hidden: int = 5):
        super().__init__()
        self.body = nn.Linear(IN, hidden, dtype=torch.float64)
        self.head = nn.Linear(hidden, num_tasks, dtype=torch.float64)

    def forward(self, hop_features, **kwargs):
        return {"logits": self.head(torch.tanh(self.body(hop_features.flatten(1).double())))}


@pytest.fixture(scope="module")
def task_set(tiny_graph):
    return tiny_graph.task_set(num_hops=2)


def _perturbed(model, scale=0.3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return ft


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(now[name], value), name  # bit for bit


def test_linear_model_has_zero_first_order_error(task_set):
    torch.manual_seed(0)
    model = LinearInParams(task_set.num_all_tasks)
    theta0 = _state(model)
    out = first_order_check(model, _perturbed(model), task_set, TaskLogitScore(), norms=(5, 1))
    assert list(out.columns) == list(COLUMNS)
    assert out["norm"].tolist() == [5.0, 1.0]
    assert (out["num_examples"] == len(task_set.examples("validation")["task"])).all()
    assert out["first_order_error"].max() < 1e-10
    assert (out["zeroth_order_error"] > 1e-3).all()
    _same_state(model, theta0)


def test_jvp_equals_per_example_autograd_and_finite_differences(task_set):
    torch.manual_seed(0)
    model = TanhMLP(task_set.num_all_tasks)
    delta = parameter_delta(model, _perturbed(model).state_dict())
    got = score_jvp(model, delta, task_set, TaskLogitScore(), split="validation", batch_size=17)
    ex = task_set.examples("validation")
    np.testing.assert_array_equal(got["example_id"], ex["example_id"])
    np.testing.assert_array_equal(got["task"], ex["task"])
    hops = task_set.dataset.with_format("torch")["hop_features"]
    params = dict(model.named_parameters())
    for k in np.linspace(0, len(ex["task"]) - 1, 12).astype(int):
        row, task = int(ex["example_id"][k]), int(ex["task"][k])
        score = model(hops[row][None])["logits"][0, task]
        grads = torch.autograd.grad(score, list(params.values()))
        dot = sum((g * delta[n]).sum() for n, g in zip(params, grads, strict=True))
        assert got["score"][k] == pytest.approx(score.item(), rel=1e-12, abs=1e-12)
        assert got["jvp"][k] == pytest.approx(dot.item(), rel=1e-10, abs=1e-12)
        h, fd = 1e-5, []
        for sign in (1, -1):
            with torch.no_grad():
                moved = copy.deepcopy(model)
                for n, p in moved.named_parameters():
                    p.add_(sign * h * delta[n])
                fd.append(moved(hops[row][None])["logits"][0, task].item())
        assert got["jvp"][k] == pytest.approx((fd[0] - fd[1]) / (2 * h), rel=1e-6, abs=1e-8)


def test_error_decays_quadratically_and_zeroth_order_linearly(task_set):
    torch.manual_seed(0)
    model = TanhMLP(task_set.num_all_tasks)
    with torch.no_grad():  # scores away from 0, so the relative error is in its Taylor regime
        model.head.bias.fill_(3.0)
    out = first_order_check(
        model, _perturbed(model), task_set, TaskLogitScore(), norms=(0.04, 0.02, 0.01)
    )
    first, zeroth = out["first_order_error"].to_numpy(), out["zeroth_order_error"].to_numpy()
    # squared relative error of a Taylor remainder O(‖Δ‖²): halving ‖Δ‖ divides it by ~16
    assert 12 < first[0] / first[1] < 20 and 12 < first[1] / first[2] < 20
    # the zeroth-order remainder is O(‖Δ‖): ~4
    assert 3 < zeroth[1] / zeroth[2] < 5
    assert (first < zeroth).all()


def test_sign_model_non_head_default_norms_and_theta0_restored(tiny_graph, task_set):
    torch.manual_seed(0)
    config = SignConfig(in_features=6, num_hops=2, hidden_size=4, task_names=tiny_graph.task_names)
    model = SignForMultiTaskNodeClassification(config).train()
    ft = _perturbed(model, scale=0.05)
    theta0 = _state(model)
    out = first_order_check(model, ft, task_set, exclude="head", max_examples=50)
    assert out["norm"].tolist() == list(DEFAULT_NORMS)
    assert (out["num_examples"] == 50).all() and model.training
    assert np.isfinite(out[["first_order_error", "zeroth_order_error"]].to_numpy()).all()
    _same_state(model, theta0)
    # fractions of ‖θ0‖ over the same (non-head) parameters (A.7 text)
    norm0 = np.sqrt(
        sum((p.double() ** 2).sum().item() for n, p in theta0.items() if "head" not in n)
    )
    by_fraction = first_order_check(
        model, ft.state_dict(), task_set, fractions=(0.01, 0.02), exclude="head", max_examples=50
    )
    np.testing.assert_allclose(by_fraction["norm"], [0.01 * norm0, 0.02 * norm0], rtol=1e-12)
    np.testing.assert_allclose(by_fraction["fraction"], [0.01, 0.02])
    # only the head excluded: a Δ on the head alone is rejected as zero
    head_only = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in head_only.named_parameters():
            if name.startswith("head."):
                p.add_(1.0)
    with pytest.raises(TaeError, match="Δ = 0"):
        first_order_check(model, head_only, task_set, exclude="head")
    _same_state(model, theta0)


def test_bad_inputs(task_set):
    model = TanhMLP(task_set.num_all_tasks)
    ft = _perturbed(model)
    with pytest.raises(TaeError, match=r"norms must be finite numbers > 0.*\[0\.0, -1\.0\]"):
        first_order_check(model, ft, task_set, TaskLogitScore(), norms=(1.0, 0.0, -1.0))
    with pytest.raises(TaeError, match="fractions must be"):
        first_order_check(model, ft, task_set, TaskLogitScore(), fractions=(float("nan"),))
    with pytest.raises(TaeError, match="not both"):
        first_order_check(model, ft, task_set, TaskLogitScore(), norms=(1,), fractions=(0.1,))
    state = ft.state_dict()
    missing = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(TaeError, match=r"lacks the parameters \['head.bias'\]"):
        first_order_check(model, missing, task_set, TaskLogitScore())
    with pytest.raises(TaeError, match=r"theta_ft\['body.weight'\] has shape \(2, 2\)"):
        first_order_check(
            model, {**state, "body.weight": torch.zeros(2, 2)}, task_set, TaskLogitScore()
        )
    with pytest.raises(TaeError, match=r"entries \['extra'\] that the model does not have"):
        first_order_check(model, {**state, "extra": torch.zeros(1)}, task_set, TaskLogitScore())
    with pytest.raises(TaeError, match="pass score_fn="):
        first_order_check(model, ft, task_set)


def test_jvp_on_a_lora_t5_with_sdpa_attention_equals_autograd(tmp_path):
    """Transformers' ``sdpa`` attention runs the fused CPU kernel, which has no forward-mode
    derivative; ``score_jvp`` must still give ∇s·Δ of the text family's LoRA T5, equal to
    reverse-mode autograd example by example."""
    from text_helpers import tiny_text_family

    from hf_tae.evaluation.first_order import _example_batches

    family, args, tasks = tiny_text_family("instructions", tmp_path / "base",
                                           train_per_template=4, eval_per_template=2)  # fmt: skip
    torch.manual_seed(0)
    model = family.model_init(args, tasks)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    delta = {n: 0.1 * torch.randn_like(p) for n, p in trainable.items()}
    score_fn, collate = family.score_function(args), family.collate_fn(args)
    got = score_jvp(model, delta, tasks, score_fn, split="validation", collate_fn=collate,
                    batch_size=64)  # fmt: skip
    model.eval()
    (inputs, meta), = list(_example_batches(tasks, "validation", 10_000, collate,
                                             torch.device("cpu"), None, 0))  # fmt: skip
    scores = score_fn(model(**inputs), {**inputs, **meta})
    assert np.allclose(got["score"], scores.detach().double().numpy(), atol=1e-5)
    for k in range(0, len(scores), 3):
        grads = torch.autograd.grad(scores[k], list(trainable.values()), retain_graph=True)
        dot = sum((g * delta[n]).sum() for n, g in zip(trainable, grads, strict=True))
        assert got["jvp"][k] == pytest.approx(dot.item(), rel=1e-4, abs=1e-6)
