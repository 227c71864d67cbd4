"""Helpers shared by the gradient-capture tests: a float64 capture and the naive reference."""

from __future__ import annotations

import warnings

import torch

from hf_tae.gradients.capture import ProjectedGradientCapture


def run_capture(model, batch, score, **kwargs):
    """Float64 capture of ``score(model, batch)``; returns the capture and ``z`` ``[B, dim]``."""
    capture = ProjectedGradientCapture(model, dtype=torch.float64, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "modules .* ran on inputs without the batch")
        with capture:
            z = capture.per_example(score(model, batch))
    return capture, z


def naive_grads(model, batch, score, names):
    """{name: [B, *shape]}: one autograd.grad of s_e per example on the batched forward."""
    params = dict(model.named_parameters())
    scores = score(model, batch)
    rows = [
        torch.autograd.grad(scores[e], [params[n] for n in names], retain_graph=True)
        for e in range(len(scores))
    ]
    return {n: torch.stack([row[i] for row in rows]) for i, n in enumerate(names)}


def assert_close(actual, expected, rtol=1e-9):
    """Max abs error within ``rtol`` of the reference's largest entry."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, err
