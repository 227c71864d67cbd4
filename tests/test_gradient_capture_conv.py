"""Factored per-example gradient projection of convolutions against independent references.

The references are per-example gradients from one ``torch.autograd.grad`` of each ``s_e``
(on the same batched forward pass), in the weight's own shape, multiplied by projection
matrices built explicitly from the capture's blocks (``matrix_block``, ``row_factor``,
``col_factor``). Nothing in them unfolds patches, so the patch order of the factored path,
its padding, stride, dilation and group handling are checked, not assumed. float64 throughout.
"""

import functools

import peft
import pytest
import torch
from capture_helpers import assert_close, naive_grads, run_capture
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from hf_tae.gradients import KroneckerBlock, ProjectedGradientCapture
from hf_tae.gradients import capture as capture_module
from hf_tae.gradients.capture import conv_features
from hf_tae.models.scores import GoldLogOddsScore

pytestmark = pytest.mark.filterwarnings(  # torch's note on padding="same" with even kernels
    "ignore:Using padding='same' with even kernel:UserWarning"
)
torch.set_num_threads(1)
B = 3
ORDERS = [None, "grads_first", "positions_first"]  # conv_features: automatic or forced


# --------------------------------------------------------------------------- helpers
def _close(actual, expected, rtol=1e-10):
    assert_close(actual, expected, rtol)







def _matrix_block(projector, name):
    """Rows of ``P`` for ``name`` in float64, from the projector's own factors and blocks.

    ``projector.matrix_block`` forms the Kronecker product in float32 (≈1e-8 relative error
    when the factor scales are not powers of 2), so the product is formed here in float64.
    """
    block, f64 = projector.blocks[name], torch.float64
    if isinstance(block, KroneckerBlock):
        rows, cols = block.row_factor(dtype=f64), block.col_factor(dtype=f64)
        rows = torch.eye(block.shape[0], dtype=f64) if rows is None else rows
        cols = torch.eye(block.shape[1], dtype=f64) if cols is None else cols
        stage1 = torch.kron(rows, cols)
    else:
        stage1 = block.matrix().double()  # identity or dense JL: float32 values, exact
    if projector.stage2:
        return stage1 @ projector.stage2[name].matrix().double()
    if projector.kind == "dense":
        return stage1
    full = torch.zeros(stage1.shape[0], projector.output_dim, dtype=f64)
    full[:, projector.offsets[name]] = stage1
    return full


def _explicit(capture, grads):
    """``Σ_name grad_name.flatten(1) @ P_name`` with ``P`` materialized block by block."""
    return sum(g.flatten(1) @ _matrix_block(capture.projector, n) for n, g in grads.items())


def _check(model, batch, score, order=None, monkeypatch=None, **kwargs):
    """Capture, compare with the explicit projection of naive grads; return the capture."""
    if order is not None:
        forced = functools.partial(conv_features, order=order)
        monkeypatch.setattr(capture_module, "conv_features", forced)
    capture, z = run_capture(model, batch, score, **kwargs)
    grads = naive_grads(model, batch, score, [n for n, _ in capture.parameters])
    assert z.shape == (B, capture.output_dim) and z.abs().max() > 0
    _close(z, _explicit(capture, grads))
    return capture, z, grads


class ConvScore(nn.Module):
    """A convolution followed by a fixed nonlinear readout (so gradients vary by example)."""

    def __init__(self, conv, in_shape):
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            out = conv(torch.zeros(1, *in_shape))
        self.register_buffer("readout", torch.randn(out.shape[1:]))

    def forward(self, x):
        return (torch.tanh(self.conv(x)) * self.readout).flatten(1).sum(1)


def _conv_model(conv, in_shape):
    torch.manual_seed(0)
    model = ConvScore(conv, in_shape).double().eval()
    batch = {"x": torch.randn(B, *in_shape, dtype=torch.float64)}
    return model, batch, lambda model, batch: model(batch["x"])


CONVS = {  # name: (module factory, input shape without the batch)
    "stride2": (lambda: nn.Conv2d(3, 5, 3, stride=2), (3, 9, 9)),
    "padding1": (lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 6, 7)),
    "same_even_kernel": (lambda: nn.Conv2d(3, 5, (2, 4), padding="same"), (3, 6, 7)),
    "valid": (lambda: nn.Conv2d(3, 5, 3, padding="valid"), (3, 6, 6)),
    "dilation2": (lambda: nn.Conv2d(3, 5, 3, dilation=2, padding=2), (3, 7, 8)),
    "dilation_same": (lambda: nn.Conv2d(3, 5, (3, 2), dilation=(1, 3), padding="same"), (3, 6, 7)),
    "groups2": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 5, 5)),
    "groups3_stride": (lambda: nn.Conv2d(6, 9, (3, 2), groups=3, stride=(2, 1)), (6, 7, 6)),
    "depthwise": (lambda: nn.Conv2d(5, 5, 3, groups=5, padding=1), (5, 5, 6)),
    "depthwise_x2": (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1, bias=False), (4, 5, 5)),
    "no_bias": (lambda: nn.Conv2d(3, 5, 3, bias=False), (3, 6, 6)),
    "non_square": (lambda: nn.Conv2d(3, 5, (1, 4), stride=(2, 1), padding=(1, 0)), (3, 7, 8)),
    "reflect": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (3, 5, 6)),
    "circular_same": (lambda: nn.Conv2d(3, 5, (2, 3), padding="same", padding_mode="circular"),
                      (3, 5, 6)),
    "replicate": (lambda: nn.Conv2d(3, 5, 3, padding=(2, 1), padding_mode="replicate"), (3, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 4, stride=2, padding=1, groups=1), (3, 11)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (2, 3, 2), padding=(1, 0, 1), groups=2), (2, 4, 5, 3)),
}  # fmt: skip
MODES = {
    "factored": {"factor_dim": 3, "dim": 7},  # both factors project (C_out, patch > 3)
    "stage1": {"factor_dim": 3, "second_stage": False, "dim": None},
    "identity": {"factor_dim": 200, "second_stage": False, "dim": None},  # exact gradients
    "dense": {"kind": "dense", "dim": 7},  # the exact torch.func path
}


# --------------------------------------------------------------------------- exactness
# the contraction order matters only when both factors project
MODE_ORDERS = [("factored", order) for order in ORDERS] + [
    (mode, None) for mode in MODES if mode != "factored"
]


@pytest.mark.parametrize(("mode", "order"), MODE_ORDERS)
@pytest.mark.parametrize("which", list(CONVS))
def test_conv_matches_naive_per_example_grads(which, mode, order, monkeypatch):
    make, in_shape = CONVS[which]
    capture, _, _ = _check(*_conv_model(make(), in_shape), order, monkeypatch, **MODES[mode])
    path = "exact" if mode == "dense" else "factored"
    assert set(capture.paths.values()) == {path}
    assert ("conv.bias" in capture.paths) == (make().bias is not None)


@pytest.mark.parametrize("which", ["stride2", "groups3_stride", "depthwise_x2", "conv3d"])
def test_conv_features_are_kronecker_projections_of_the_weight_gradient(which):
    """Stage 1 = ``P_outᵀ G P_in`` with ``G`` the autograd gradient viewed as [C_out, rest]."""
    make, in_shape = CONVS[which]
    model, batch, score = _conv_model(make(), in_shape)
    capture, z = run_capture(model, batch, score, factor_dim=3, second_stage=False, dim=None)
    grad = naive_grads(model, batch, score, ["conv.weight"])["conv.weight"]
    block = capture.projector.blocks["conv.weight"]
    assert block.shape == (grad.shape[1], grad[0, 0].numel())
    rows, cols = block.row_factor(dtype=torch.float64), block.col_factor(dtype=torch.float64)
    expected = (rows.T @ grad.reshape(B, *block.shape) @ cols).flatten(1)
    _close(z[:, capture.projector.offsets["conv.weight"]], expected)


def test_conv_features_orders_agree_with_an_explicit_sum():
    torch.manual_seed(0)
    grads = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # B, G, C_out/G, L
    inputs = torch.randn(2, 3, 6, 5, dtype=torch.float64)  # B, G, k_in, L
    rows = torch.randn(12, 7, dtype=torch.float64)  # C_out, k_out
    expected = torch.zeros(2, 7, 6, dtype=torch.float64)
    for j in range(3):
        block_rows = rows[4 * j : 4 * (j + 1)]
        for p in range(5):
            expected += (grads[:, j, :, p] @ block_rows)[:, :, None] * inputs[:, j, None, :, p]
    for order in ORDERS:
        _close(conv_features(grads, inputs, rows, order), expected)
    identity = conv_features(grads, inputs, None)
    _close(identity, conv_features(grads, inputs, torch.eye(12, dtype=torch.float64)))


# --------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, groups=2, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv2(torch.relu(self.norm(self.conv1(x))))
        return self.head(self.pool(h).flatten(1))


def _gold_log_softmax(model, batch):
    logits = model(batch["x"])
    return logits.log_softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["factored", "stage1"])
def test_small_cnn(mode, order, monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():  # non-trivial eval-mode statistics
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
    model = model.double().eval()
    batch = {"x": torch.randn(B, 2, 7, 7, dtype=torch.float64), "labels": torch.tensor([0, 3, 1])}
    capture, _, _ = _check(model, batch, _gold_log_softmax, order, monkeypatch, **MODES[mode])
    assert capture.paths == {
        "conv1.weight": "factored",
        "conv1.bias": "factored",
        "norm.weight": "exact",
        "norm.bias": "exact",
        "conv2.weight": "factored",
        "head.weight": "factored",
        "head.bias": "factored",
    }


def _resnet():
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10
    )
    model = ResNetForImageClassification(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)  # not all 1: a less symmetric network
    batch = {"pixel_values": torch.randn(B, 1, 8, 8), "labels": torch.tensor([2, 7, 0])}
    score = GoldLogOddsScore()

    def gold_log_odds(model, batch):
        return score(model(pixel_values=batch["pixel_values"]), batch)

    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    return model.double().eval(), batch, gold_log_odds


@pytest.mark.parametrize("mode", ["factored", "stage1"])
def test_tiny_resnet_gold_log_odds(mode):
    model, batch, score = _resnet()
    capture, z, grads = _check(model, batch, score, **MODES[mode])
    convs = [n for n in capture.paths if n.endswith("convolution.weight")]
    assert len(convs) == 8
    assert all(capture.paths[n] == "factored" for n in convs)
    assert {p for n, p in capture.paths.items() if "normalization" in n} == {"exact"}
    # every conv block contributes: the features of the convolutions alone are non-zero
    conv_z = _explicit(capture, {n: grads[n] for n in convs})
    assert conv_z.abs().max() > 1e-3 * z.abs().max()


# --------------------------------------------------------------------------- adjoint
@pytest.mark.parametrize("mode", ["factored", "stage1"])
def test_lift_is_the_adjoint_for_conv_weights(mode):
    model, batch, score = _resnet()
    capture, z, grads = _check(model, batch, score, **MODES[mode])
    torch.manual_seed(1)
    v = torch.randn(capture.output_dim, dtype=torch.float64)
    lifted = capture.lift(v)
    for name, shape in capture.parameters:
        if not name.endswith("convolution.weight"):
            continue
        assert tuple(lifted[name].shape) == shape and len(shape) == 4
        w = torch.randn(1, *shape, dtype=torch.float64)
        lhs = capture.projector.project({**_zeros(capture), name: w})[0] @ v  # ⟨P^T w, v⟩
        rhs = (w[0] * lifted[name]).sum()  # ⟨w, P v⟩
        assert lhs.item() == pytest.approx(rhs.item(), rel=1e-11)
        _close(lifted[name].flatten(), _matrix_block(capture.projector, name) @ v)
    # the captured features pair with the lift exactly as the true per-example gradients do
    expected = torch.stack([sum((grads[n][e] * lifted[n]).sum() for n in lifted) for e in range(B)])
    _close(z @ v, expected)


def _zeros(capture):
    return {n: torch.zeros(1, *s, dtype=torch.float64) for n, s in capture.parameters}


# --------------------------------------------------------------------------- edge cases
class SharedInputs(nn.Module):
    """Convolutions whose inputs lack the batch axis: a shared template, frames of a clip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.frames = nn.Conv2d(2, 3, 2, stride=2)
        self.register_buffer("template", torch.randn(2, 4, 4))

    def forward(self, x):  # x: [B, T, 2, 4, 4]
        size, steps = x.shape[:2]
        clip = self.frames(x.reshape(size * steps, 2, 4, 4)).reshape(size, -1)
        return torch.tanh(self.conv(x[:, 0]) * self.conv(self.template)).flatten(1).sum(1) + (
            clip.sin().sum(1)
        )


@pytest.mark.parametrize("order", ORDERS)
def test_unbatched_conv_calls(order, monkeypatch):
    torch.manual_seed(0)
    model = SharedInputs().double().eval()
    batch = {"x": torch.randn(B, 2, 2, 4, 4, dtype=torch.float64)}
    capture, _, _ = _check(
        model, batch, lambda m, b: m(b["x"]), order, monkeypatch, factor_dim=3, dim=9
    )
    assert set(capture.paths.values()) == {"factored"}


def test_conv_subclasses_that_change_forward_take_the_exact_path():
    class Standardized(nn.Conv2d):  # weight standardization, as BiT's
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    model = ConvScore(Standardized(2, 4, 3), (2, 5, 5))
    torch.manual_seed(0)
    model, batch = model.double().eval(), {"x": torch.randn(B, 2, 5, 5, dtype=torch.float64)}
    capture, _, _ = _check(model, batch, lambda m, b: m(b["x"]), factor_dim=3, dim=7)
    assert capture.paths == {"conv.weight": "exact", "conv.bias": "exact"}
    transposed = ProjectedGradientCapture(nn.ConvTranspose2d(2, 3, 3))
    assert set(transposed.paths.values()) == {"exact"}
    assert capture_module.factored_layer(nn.Conv2d(2, 3, 3)) == "conv"


# --------------------------------------------------------------------------- batch norm
class Norms(nn.Module):
    """Eval-mode batch norms on batched inputs of every rank and on a shared (unbatched) input."""

    def __init__(self):
        super().__init__()
        self.flat, self.seq = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        self.image, self.volume = nn.BatchNorm2d(3), nn.BatchNorm3d(3)
        self.shared = nn.BatchNorm2d(3)
        self.register_buffer("template", torch.randn(2, 3, 2, 2))

    def forward(self, x):  # x: [B, 3, 2, 2, 2]
        shared = self.shared(self.template)  # rows enter differently: distinct cotangents
        outs = [
            self.flat(x[:, :, 0, 0, 0]),
            self.seq(x[:, :, 0, 0]),
            self.image(x[:, :, 0]),
            self.volume(x),
            self.image(x[:, :, 1]) * shared[0] * shared[1].exp(),
        ]
        return sum(torch.tanh(out).flatten(1).pow(2).sum(1) for out in outs)


@pytest.mark.parametrize("closed_form", [True, False])
def test_eval_batch_norm_grads(closed_form, monkeypatch):
    torch.manual_seed(0)
    model = Norms()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    model = model.double().eval()
    if not closed_form:  # the torch.func path, as a second reference
        monkeypatch.setattr(capture_module, "batch_norm_eval_grads", lambda *args: None)
    batch = {"x": torch.randn(B, 3, 2, 2, 2, dtype=torch.float64)}
    capture, _, _ = _check(model, batch, lambda m, b: m(b["x"]), factor_dim=3, dim=11)
    assert set(capture.paths.values()) == {"exact"}


def test_batch_norm_closed_form_only_on_running_statistics():
    norm = nn.BatchNorm2d(3).double()
    x = torch.randn(B, 3, 2, 2, dtype=torch.float64)
    cotangents = torch.randn(B, 3, 2, 2, dtype=torch.float64)
    closed = functools.partial(
        capture_module.batch_norm_eval_grads, attrs=["weight", "bias"], args=(x,), kwargs={}
    )
    assert closed(norm.train(), cotangents=cotangents, batched=True) is None  # batch statistics
    grads = closed(norm.eval(), cotangents=cotangents, batched=True)
    expected = []
    for e in range(B):  # independent reference: autograd through the module, one example
        out = norm(x[e : e + 1].clone())
        expected.append(torch.autograd.grad(out, [norm.weight, norm.bias], cotangents[e : e + 1]))
    _close(grads["weight"], torch.stack([w for w, _ in expected]))
    _close(grads["bias"], torch.stack([b for _, b in expected]))
    untracked = nn.BatchNorm2d(3, track_running_stats=False).double().eval()
    assert closed(untracked, cotangents=cotangents, batched=True) is None


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_convolution_adapters():
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["conv1"], init_lora_weights=False)
    model = peft.get_peft_model(SmallCNN(), config).double().eval()
    batch = {"x": torch.randn(B, 2, 7, 7, dtype=torch.float64), "labels": torch.tensor([0, 3, 1])}
    capture, _, _ = _check(model, batch, _gold_log_softmax, factor_dim=3, dim=7)
    assert len(capture.paths) == 2 and set(capture.paths.values()) == {"factored"}
    assert [shape[2:] for _, shape in capture.parameters] == [(3, 3), (1, 1)]  # lora_A, lora_B
