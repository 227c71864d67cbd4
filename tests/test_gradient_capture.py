"""ProjectedGradientCapture and the seeded projections against independent references.

The reference per-example gradients come from a plain loop of ``torch.autograd.grad`` of
each ``s_e`` (on the same batched forward pass) with respect to each parameter; they are
flattened and multiplied by explicitly materialized projection blocks.
"""

import json
import warnings

import peft
import pytest
import torch
from capture_helpers import assert_close, naive_grads, run_capture
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from hf_tae import SignConfig, SignForMultiTaskNodeClassification, TaeError
from hf_tae.gradients import (
    DenseBlock,
    GradientProjector,
    KroneckerBlock,
    MatrixCache,
    ProjectedGradientCapture,
    random_matrix,
    stable_seed,
)

pytestmark = pytest.mark.filterwarnings(  # raised by peft when it wraps a transformers 5 model
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

B = 4  # examples per batch; equals the T5 source length to exercise unbatched lookups


# --------------------------------------------------------------------------- models and scores
def _sign():
    config = SignConfig(in_features=6, num_hops=2, hidden_size=8, num_tasks=3)
    model = SignForMultiTaskNodeClassification(config)
    batch = {"hop_features": torch.randn(B, 3, 6)}
    tasks = torch.arange(B) % 3

    def score(model, batch):  # logit of each example's own task
        logits = model(hop_features=batch["hop_features"]).logits
        return logits.gather(1, tasks[: len(logits), None]).squeeze(1)

    return model, batch, score


def _gpt2_model():
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    )


def _gpt2_score(model, batch):  # mean gold-token log-probability of the next tokens
    ids = batch["input_ids"]
    logprobs = model(**batch).logits[:, :-1].log_softmax(-1)
    return logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(1)


def _gpt2():
    return _gpt2_model(), {"input_ids": torch.randint(0, 50, (B, 7))}, _gpt2_score


def _gpt2_lora():
    config = peft.LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    return peft.get_peft_model(_gpt2_model(), config), _gpt2()[1], _gpt2_score


def _t5_model():
    config = T5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def _t5_score(model, batch):  # mean gold-token log-probability of the target
    logprobs = model(**batch).logits.log_softmax(-1)
    return logprobs.gather(-1, batch["labels"][..., None]).squeeze(-1).mean(1)


def _t5_batch():
    return {"input_ids": torch.randint(0, 50, (B, B)), "labels": torch.randint(0, 50, (B, 3))}


def _t5():
    return _t5_model(), _t5_batch(), _t5_score


def _t5_lora():
    config = peft.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False)
    return peft.get_peft_model(_t5_model(), config), _t5_batch(), _t5_score


CASES = {"sign": _sign, "gpt2": _gpt2, "gpt2_lora": _gpt2_lora, "t5": _t5, "t5_lora": _t5_lora}
MODES = {
    "dense": {"kind": "dense"},
    "dense_gaussian": {"kind": "dense", "dense_kind": "gaussian"},
    "factored": {"kind": "factored", "factor_dim": 4},
    "factored_stage1": {"kind": "factored", "factor_dim": 4, "second_stage": False, "dim": None},
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(model in float64 eval mode, batch, score function)."""
    torch.manual_seed(0)
    model, batch, score = CASES[request.param]()
    return model.double().eval(), _double(batch), score


def _double(batch):
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}








# --------------------------------------------------------------------------- (1) exactness
@pytest.mark.parametrize("mode", list(MODES))
def test_projected_grads_equal_naive_per_example_grads(case, mode):
    model, batch, score = case
    capture, z = run_capture(model, batch, score, **MODES[mode])
    names = [name for name, _ in capture.parameters]
    grads = naive_grads(model, batch, score, names)
    reference = sum(
        grads[n].flatten(1) @ capture.projector.matrix_block(n) for n in names
    )  # explicit P
    assert z.shape == (B, capture.output_dim) and z.dtype == torch.float64
    assert z.abs().max() > 0
    assert_close(z, reference)
    assert_close(capture.projector.project(grads), reference)


def test_paths_cover_tied_unbatched_and_lora_parameters():
    torch.manual_seed(0)
    capture = ProjectedGradientCapture(_gpt2_model(), factor_dim=4)
    assert capture.paths["transformer.wte.weight"] == "factored"  # embedding tied to lm_head
    assert capture.paths["transformer.h.0.attn.c_attn.weight"] == "factored"  # Conv1D
    assert capture.paths["transformer.h.0.ln_1.weight"] == "exact"
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"):
        assert isinstance(capture.projector.blocks[name], KroneckerBlock)
    lora = ProjectedGradientCapture(_gpt2_lora()[0])
    assert set(lora.paths.values()) == {"factored"}
    assert all("lora_" in name for name, _ in lora.parameters)  # only the adapters
    dense = ProjectedGradientCapture(_gpt2_model(), kind="dense")
    assert set(dense.paths.values()) == {"exact"}


@pytest.mark.parametrize("kind", ["factored", "dense"])
def test_tied_and_padded_embeddings(kind):
    class Mix(torch.nn.Module):  # a leaf module that the factored path does not know
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, h):
            return h + h @ self.weight[:6] * 0.1

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Embedding(11, 6)
            self.padded = torch.nn.Embedding(11, 6, padding_idx=0)
            self.mix = Mix(self.shared.weight)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.shared.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.shared(ids) + self.padded(ids))))

    torch.manual_seed(0)
    model = Tied().double().eval()
    batch = {"ids": torch.tensor([[0, 3, 3, 5], [1, 0, 2, 2], [4, 4, 4, 0], [7, 8, 9, 10]])}

    def score(model, batch):
        return model(batch["ids"]).log_softmax(-1)[:, -1].gather(1, batch["ids"][:, :1]).squeeze(1)

    capture, z = run_capture(model, batch, score, kind=kind, factor_dim=4, dim=9)
    expected = {"factored": "exact+factored", "dense": "exact"}[kind]
    assert capture.paths["shared.weight"] == expected
    assert capture.paths["padded.weight"] == {"factored": "factored", "dense": "exact"}[kind]
    grads = naive_grads(model, batch, score, [n for n, _ in capture.parameters])
    assert_close(z, capture.projector.project(grads))


def test_non_leaf_owner_takes_the_loop_path():
    class WithToken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token = torch.nn.Parameter(torch.randn(3))
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(x * self.token)

    torch.manual_seed(0)
    model = WithToken().double().eval()
    x = torch.randn(B, 3, dtype=torch.float64)

    def score(model, batch):
        return model(batch["x"]).pow(2).sum(1)

    capture, z = run_capture(model, {"x": x}, score, factor_dim=2, dim=7)
    assert capture.paths == {
        "token": "loop",
        "linear.weight": "factored",
        "linear.bias": "factored",
    }
    grads = naive_grads(model, {"x": x}, score, [n for n, _ in capture.parameters])
    assert_close(z, capture.projector.project(grads))


@pytest.mark.parametrize("which", ["sign", "gpt2", "gpt2_lora"])
def test_factored_features_are_kronecker_projections_of_materialized_grads(which):
    torch.manual_seed(0)
    model, batch, score = CASES[which]()
    model, batch = model.double().eval(), _double(batch)
    capture, z = run_capture(model, batch, score, factor_dim=4, second_stage=False, dim=None)
    blocks = capture.projector.blocks
    kron = [n for n, b in blocks.items() if isinstance(b, KroneckerBlock)]
    grads = naive_grads(model, batch, score, kron)
    assert kron
    for name in kron:
        block = capture.projector.blocks[name]
        rows = block.row_factor(dtype=torch.float64)
        cols = block.col_factor(dtype=torch.float64)
        rows = torch.eye(block.shape[0], dtype=torch.float64) if rows is None else rows
        cols = torch.eye(block.shape[1], dtype=torch.float64) if cols is None else cols
        # for nn.Linear rows = out, cols = in (P_outᵀ G P_in); GPT-2 Conv1D stores G as [in, out]
        grad = grads[name].reshape(B, *block.shape)
        expected = (rows.T @ grad @ cols).flatten(1)
        got = z[:, capture.projector.offsets[name]]
        assert_close(got, expected)
        assert_close(got, grad.flatten(1) @ torch.kron(rows, cols))  # dense P = P_r ⊗ P_c


def test_warns_about_modules_that_did_not_run():
    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Skip().eval()
    capture = ProjectedGradientCapture(model, dim=5)
    with capture, pytest.warns(UserWarning, match=r"unused\.weight.*did not run"):
        capture.per_example(model(torch.randn(B, 3)).sum(1))


# --------------------------------------------------------------------------- (2) adjoint
@pytest.mark.parametrize("mode", list(MODES))
def test_lift_is_the_adjoint_of_the_projection(mode):
    torch.manual_seed(0)
    model, batch, score = _gpt2()
    capture = ProjectedGradientCapture(model.double(), dtype=torch.float64, **MODES[mode])
    grads = {n: torch.randn(1, *shape, dtype=torch.float64) for n, shape in capture.parameters}
    w = torch.randn(capture.output_dim, dtype=torch.float64)
    lifted = capture.lift(w)
    assert {n: tuple(t.shape) for n, t in lifted.items()} == dict(capture.parameters)
    lhs = capture.projector.project(grads)[0] @ w
    rhs = sum((grads[n][0] * lifted[n]).sum() for n in lifted)
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-10)
    explicit = torch.cat([capture.projector.matrix_block(n) for n, _ in capture.parameters]) @ w
    assert_close(torch.cat([lifted[n].flatten() for n, _ in capture.parameters]), explicit)


def test_metadata_is_json_and_rebuilds_the_same_projection():
    torch.manual_seed(0)
    model, batch, score = _gpt2_lora()
    capture = ProjectedGradientCapture(model, dim=50, seed=3, factor_dim=4)
    meta = json.loads(json.dumps(capture.metadata()))
    assert meta["kind"] == "factored" and meta["dim"] == 50 and meta["seed"] == 3
    assert meta["parameters"] == [[n, list(s)] for n, s in capture.parameters]
    assert meta["paths"] == capture.paths and meta["version"] == 1
    rebuilt = GradientProjector.from_metadata(meta)
    w = torch.randn(50)
    for name, delta in rebuilt.lift(w).items():
        assert torch.equal(delta, capture.lift(w)[name])


# --------------------------------------------------------------------------- (3) batch size
@pytest.mark.parametrize("kind", ["factored", "dense"])
@pytest.mark.parametrize("which", ["gpt2", "gpt2_lora"])
def test_features_do_not_depend_on_the_batch_split(which, kind):
    torch.manual_seed(0)
    model, _, score = CASES[which]()
    model.eval()
    ids = torch.randint(0, 50, (6, 7))
    capture = ProjectedGradientCapture(model, dim=32, kind=kind, factor_dim=4)

    def features(chunk):
        out = []
        for start in range(0, 6, chunk):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with capture:
                    scores = score(model, {"input_ids": ids[start : start + chunk]})
                    out.append(capture.per_example(scores))
        return torch.cat(out)

    full = features(6)
    assert full.dtype == torch.float32 and full.shape == (6, 32)
    for chunk in (3, 1):
        torch.testing.assert_close(features(chunk), full, rtol=1e-4, atol=1e-5 * full.abs().max())


# --------------------------------------------------------------------------- (4) seeding
def test_matrices_depend_on_the_key_only():
    torch.manual_seed(123)
    a = random_matrix(0, "layer.weight", "rows", (64, 16))
    torch.manual_seed(999)
    torch.rand(10)
    assert torch.equal(a, random_matrix(0, "layer.weight", "rows", (64, 16)))
    for other in [
        random_matrix(1, "layer.weight", "rows", (64, 16)),
        random_matrix(0, "layer.bias", "rows", (64, 16)),
        random_matrix(0, "layer.weight", "cols", (64, 16)),
    ]:
        assert not torch.equal(a, other)
    assert set(a.unique().tolist()) == {-0.25, 0.25}  # ±1/√16
    gaussian = random_matrix(0, "w", "rows", (4000, 50), "gaussian")
    assert gaussian.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=0.02)  # N(0, 1/k)
    assert stable_seed(0, "w", "rows", (3, 2)) == stable_seed(0, "w", "rows", [3, 2])
    assert stable_seed(0, "w", "rows", (3, 2)) < 2**63


def test_dense_blocks_are_tiled_and_cache_neutral(monkeypatch):
    import hf_tae.gradients.projection as projection

    monkeypatch.setattr(projection, "TILE_ENTRIES", 64)  # tiles of 4 rows for out_dim 16
    cached = DenseBlock("p", 10, 16, seed=0, kind="rademacher", role="dense", cache=MatrixCache())
    uncached = DenseBlock(
        "p", 10, 16, seed=0, kind="rademacher", role="dense", cache=MatrixCache(0)
    )
    assert [(a, b) for a, b, _ in cached.tiles()] == [(0, 4), (4, 8), (8, 10)]
    assert torch.equal(cached.matrix(), uncached.matrix()) and uncached.cache.used_bytes == 0
    g = torch.randn(3, 10)
    torch.testing.assert_close(cached.project(g), g @ cached.matrix())
    kron = KroneckerBlock("w", (6, 3), 4, seed=0, kind="rademacher", cache=MatrixCache())
    assert kron.col_factor() is None and kron.out_dim == 12  # the 3-wide side fits


def test_capture_ignores_the_global_torch_seed():
    model, batch, score = _sign()
    model.eval()
    results = []
    for global_seed, seed in [(1, 0), (2, 0), (1, 5)]:
        torch.manual_seed(global_seed)
        capture = ProjectedGradientCapture(model, dim=16, seed=seed, factor_dim=4)
        with capture:
            results.append(capture.per_example(score(model, batch)))
    assert torch.equal(results[0], results[1])
    assert not torch.allclose(results[0], results[2])


# --------------------------------------------------------------------------- (5) restoration
def test_flags_and_hooks_are_restored_even_after_an_error():
    torch.manual_seed(0)
    model, batch, score = _gpt2()
    model.eval()
    model.transformer.wpe.weight.requires_grad_(False)  # a user choice that must survive
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    capture = ProjectedGradientCapture(model, dim=8, factor_dim=4)
    assert "transformer.wpe.weight" not in dict(capture.parameters)
    with capture:
        assert not any(p.requires_grad for p in model.parameters())  # no dW GEMMs
        assert hooks() > 0
        capture.per_example(score(model, batch))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before and hooks() == 0
    with pytest.raises(RuntimeError, match="boom"), capture:
        raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before and hooks() == 0
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- (6) bad input
def test_parameter_selection_errors_and_patterns():
    model, batch, score = _sign()
    with pytest.raises(TaeError, match=r"include=\['nothing'\].*exclude=None"):
        ProjectedGradientCapture(model, include=["nothing"])
    with pytest.raises(TaeError, match="not a valid regular expression"):
        ProjectedGradientCapture(model, exclude=["[unclosed"])
    capture = ProjectedGradientCapture(model, include=[r"^head\.\d\.weight$"], exclude="head.1")
    assert [n for n, _ in capture.parameters] == ["head.0.weight", "head.3.weight"]
    frozen = _sign()[0].requires_grad_(False)
    with pytest.raises(TaeError, match="requires_grad=True"):
        ProjectedGradientCapture(frozen)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "sparse"}, "kind must be one of"),
        ({"dense_kind": "sjlt"}, "dense_kind must be one of"),
        ({"second_stage": False}, "dim=200 has no effect"),
        ({"dim": 0}, "dim must be a positive int"),
        ({"factor_dim": 0}, "factor_dim must be a positive int"),
        ({"on_nonfinite": "skip"}, "on_nonfinite must be"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(TaeError, match=message):
        ProjectedGradientCapture(_sign()[0], **options)


def test_bad_scores_and_misuse():
    model, batch, score = _sign()
    model.eval()
    capture = ProjectedGradientCapture(model, dim=8, factor_dim=4)
    with pytest.raises(TaeError, match="inside `with capture:`"):
        capture.per_example(torch.zeros(B, requires_grad=True))
    with capture:
        with pytest.raises(TaeError, match="already active"), capture:
            pass
        logits = model(**batch).logits
        with pytest.raises(TaeError, match="1-D tensor"):
            capture.per_example(logits)
        with pytest.raises(TaeError, match="not attached"):
            capture.per_example(logits[:, 0].detach())
        with pytest.raises(TaeError, match="batch of 4"):
            capture.per_example(logits[:2, 0])
    with pytest.raises(TaeError, match="must be a floating vector of length 8"):
        capture.lift(torch.zeros(7))


def test_nonfinite_rows_raise_or_are_returned():
    model, batch, score = _sign()
    model.eval()
    poison = torch.tensor([1.0, float("nan"), 1.0, float("inf")])
    for on_nonfinite in ("raise", "return"):
        capture = ProjectedGradientCapture(model, dim=8, factor_dim=4, on_nonfinite=on_nonfinite)
        with capture:
            scores = score(model, batch) * poison
            if on_nonfinite == "raise":
                with pytest.raises(TaeError, match=r"batch positions \[1, 3\]"):
                    capture.per_example(scores)
            else:
                z = capture.per_example(scores)
    assert capture.nonfinite_positions == [1, 3]
    assert torch.isfinite(z[[0, 2]]).all() and not torch.isfinite(z[[1, 3]]).all(1).any()


def test_training_mode_warns_and_checkpointing_is_refused():
    model, batch, score = _gpt2()
    capture = ProjectedGradientCapture(model.train(), dim=8, factor_dim=4)
    with pytest.warns(UserWarning, match="training mode"), capture:
        pass
    model.eval().activation_checkpointing_enable()
    with pytest.raises(TaeError, match="activation_checkpointing_disable"), capture:
        pass
