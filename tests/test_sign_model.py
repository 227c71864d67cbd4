"""SIGN model: masked loss against an independent reference, Auto classes, save/load round trip."""

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from hf_tae import SignConfig, SignForMultiTaskNodeClassification


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = SignConfig(
        in_features=5, num_hops=2, hidden_size=12, num_tasks=4, task_names=list("abcd")
    )
    return SignForMultiTaskNodeClassification(config).eval()


def test_masked_loss_is_bce_over_selected_pairs(model):
    x = torch.randn(20, 3, 5)
    labels = (torch.rand(20, 4) > 0.5).float()
    mask = torch.rand(20, 4) > 0.4
    out = model(x, labels=labels, label_mask=mask)
    z = out.logits.detach().numpy()[mask.numpy()]
    y = labels.numpy()[mask.numpy()]
    reference = log_loss(y, 1 / (1 + np.exp(-z.astype(np.float64))), labels=[0, 1])
    assert out.loss.item() == pytest.approx(reference, rel=1e-5)
    assert out.logits.shape == (20, 4)


def test_masked_out_pairs_get_no_gradient(model):
    x = torch.randn(8, 3, 5)
    mask = torch.zeros(8, 4, dtype=torch.bool)
    mask[:, 1] = True  # only task b
    model(x, labels=torch.ones(8, 4), label_mask=mask).loss.backward()
    head_out = model.head[-1]
    assert (
        head_out.weight.grad[[0, 2, 3]].abs().sum() == 0 and head_out.weight.grad[1].abs().sum() > 0
    )


def test_save_and_auto_load_give_identical_outputs(model, tmp_path):
    from transformers import AutoConfig, AutoModel

    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).task_names == list("abcd")
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is SignForMultiTaskNodeClassification
    x = torch.randn(7, 3, 5)
    assert torch.equal(loaded(x).logits, model(x).logits)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_wrong_widths_are_clear_errors(model):
    with pytest.raises(ValueError, match=r"labels has shape \(3, 6\).*num_tasks=4"):
        model(torch.randn(3, 3, 5), labels=torch.ones(3, 6))
    with pytest.raises(ValueError, match=r"hop_features has shape.*num_hops=2"):
        model(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="task_names"):
        SignConfig(num_tasks=3, task_names=["a", "b"])


def test_import_hf_tae_is_light_and_registers_auto_classes_once_transformers_loads(model, tmp_path):
    import subprocess
    import sys

    model.save_pretrained(tmp_path)
    code = (
        "import sys, hf_tae\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "from transformers import AutoModel\n"
        f"print(type(AutoModel.from_pretrained({str(tmp_path)!r})).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("SignForMultiTaskNodeClassification")
