"""Multitask vision model: logits and loss by hand, round trips, errors, gradients.

Tiny backbones built from configs (1-channel 8×8 images). References are computed
independently: the bare backbone's pooled features through each row's own head, written out
from the head weights; the loss with ``torch.nn.functional.cross_entropy``; per-example
gradients with one ``torch.autograd.grad`` per example.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    ConvNextConfig,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

from hf_tae import GoldLogOddsScore, TaeError
from hf_tae.gradients import ProjectedGradientCapture
from hf_tae.hub import load_meta_init
from hf_tae.models import VisionForMultiTaskImageClassification, VisionMultiTaskConfig

TASKS = ["clipart", "painting", "real"]
B, CLASSES = 6, 4


def _resnet():
    return ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])


def _convnext():
    return ConvNextConfig(
        num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2
    )


def _vit():
    return ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip


# backbone config, optional backbone module, pooled features of the bare backbone's outputs
BACKBONES = {
    "resnet": (_resnet, None, lambda out: out.pooler_output.flatten(1)),  # [B, C, 1, 1]
    "convnext": (_convnext, None, lambda out: out.pooler_output),  # [B, C]
    "vit_pooler": (_vit, None, lambda out: out.pooler_output),  # tanh(dense(CLS))
    "vit_cls": (_vit, lambda c: ViTModel(c, add_pooling_layer=False),
                lambda out: out.last_hidden_state[:, 0]),
}  # fmt: skip


def _model(which="resnet", head="per_task", seed=0, **kwargs):
    make_config, make_backbone, _ = BACKBONES[which]
    torch.manual_seed(seed)
    backbone_config = make_config()
    config = VisionMultiTaskConfig(
        backbone_config=backbone_config, task_names=TASKS, num_labels=CLASSES, head=head, **kwargs
    )
    backbone = make_backbone(backbone_config) if make_backbone else None
    return VisionForMultiTaskImageClassification(config, backbone=backbone).eval()


def _batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(B, 1, 8, 8, generator=generator),
        "labels": torch.tensor([0, 3, 1, 2, 2, 0]),
        "task": torch.tensor([0, 1, 2, 2, 0, 1]),
    }


# --------------------------------------------------------------------------- logits and loss
@pytest.mark.parametrize("which", list(BACKBONES))
def test_per_task_logits_come_from_each_rows_own_head(which):
    model, batch = _model(which), _batch()
    out = model(**batch)
    with torch.no_grad():
        features = BACKBONES[which][2](model.backbone(batch["pixel_values"]))
        expected = torch.stack([
            features[e] @ model.heads[t].weight.T + model.heads[t].bias
            for e, t in enumerate(batch["task"].tolist())
        ])  # fmt: skip
    assert out.logits.shape == (B, CLASSES)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, batch["labels"]))
    assert not torch.allclose(model.heads[0].weight, model.heads[1].weight)  # distinct heads


@pytest.mark.parametrize("which", ["resnet", "vit_cls"])
def test_shared_head_logits_ignore_the_task(which):
    model, batch = _model(which, head="shared"), _batch()
    assert not hasattr(model, "heads") and model.task_head_parameter_pattern() is None
    with torch.no_grad():
        features = BACKBONES[which][2](model.backbone(batch["pixel_values"]))
        expected = features @ model.classifier.weight.T + model.classifier.bias
    out = model(batch["pixel_values"], labels=batch["labels"])  # no task needed
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, batch["labels"]))
    torch.testing.assert_close(model(**batch).logits, out.logits)


def test_loss_ignores_minus_100_and_follows_num_items_in_batch():
    model, batch = _model(), _batch()
    labels = batch["labels"].clone()
    labels[[1, 4]] = -100
    out = model(batch["pixel_values"], labels=labels, task=batch["task"])
    kept = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[kept], labels[kept]))
    summed = F.cross_entropy(out.logits, labels, ignore_index=-100, reduction="sum")
    out = model(batch["pixel_values"], labels=labels, task=batch["task"], num_items_in_batch=10)
    torch.testing.assert_close(out.loss, summed / 10)  # gradient accumulation: sum / items
    loss, logits = model(**batch, return_dict=False)
    torch.testing.assert_close(logits, model(**batch).logits)
    one_task = model(batch["pixel_values"], task=2).logits  # one id for the whole batch
    torch.testing.assert_close(
        one_task, model(batch["pixel_values"], task=torch.full((B,), 2)).logits
    )


# --------------------------------------------------------------------------- save and load
def test_save_pretrained_and_auto_classes_give_identical_logits(tmp_path):
    model, batch = _model("convnext"), _batch()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_vision.py",
        "configuration_vision.py",
    } <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["backbone_config"]["model_type"] == "convnext" and saved["task_names"] == TASKS
    assert saved["auto_map"]["AutoModel"] == "modeling_vision.VisionForMultiTaskImageClassification"
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is VisionMultiTaskConfig and config.num_tasks == 3
    assert config.num_labels == CLASSES
    assert type(config.get_backbone_config()) is ConvNextConfig
    with torch.no_grad():
        expected = model(**batch).logits
        for loader in (
            VisionForMultiTaskImageClassification,
            AutoModel,
            AutoModelForImageClassification,
        ):
            loaded = loader.from_pretrained(tmp_path).eval()
            assert type(loaded) is VisionForMultiTaskImageClassification, loader
            assert torch.equal(loaded(**batch).logits, expected), loader
        meta_init = load_meta_init(tmp_path)  # hf_tae's loader: AutoModel, eval mode
        assert type(meta_init) is VisionForMultiTaskImageClassification and not meta_init.training
        assert torch.equal(meta_init(**batch).logits, expected)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_from_backbone_keeps_pretrained_backbone_weights_and_builds_fresh_heads(tmp_path):
    torch.manual_seed(5)
    backbone = ResNetModel(_resnet()).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    model = VisionForMultiTaskImageClassification.from_backbone(
        tmp_path / "backbone", TASKS, num_labels=CLASSES, classifier_dropout=0.1
    )
    assert model.config.classifier_dropout == 0.1 and model.config.num_tasks == 3
    assert model.config.backbone_config["model_type"] == "resnet"
    assert "id2label" not in model.config.backbone_config
    for (name, a), (_, b) in zip(
        backbone.state_dict().items(), model.backbone.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for head in model.heads:  # normal(0, initializer_range) weights, zero biases
        assert 0.005 < head.weight.std().item() < 0.05 and torch.all(head.bias == 0)
    with torch.no_grad():
        batch = _batch()
        features = backbone(batch["pixel_values"]).pooler_output.flatten(1)
        model.eval()
        expected = torch.stack([model.heads[t](features[e]) for e, t in enumerate(batch["task"])])
        torch.testing.assert_close(model(**batch).logits, expected)
    shared = VisionForMultiTaskImageClassification.from_backbone(
        tmp_path / "backbone", ["a"], head="shared", id2label={0: "cat", 1: "dog"}
    )
    assert shared.config.num_labels == 2 and shared.classifier.out_features == 2


def test_fresh_process_without_hf_tae_loads_the_model_as_remote_code(tmp_path):
    model, batch = _model("resnet"), _batch()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save({**batch, "logits": expected}, tmp_path / "reference.pt")
    code = (
        "import sys, torch\n"
        "sys.modules['hf_tae'] = None  # hf_tae is not installed\n"
        "from transformers import AutoModel\n"
        f"path = {str(tmp_path)!r}\n"
        "model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()\n"
        "ref = torch.load(path + '/reference.pt')\n"
        "with torch.no_grad():\n"
        "    out = model(ref['pixel_values'], task=ref['task'])\n"
        "assert torch.equal(out.logits, ref['logits'])\n"
        "try:\n"
        "    model(ref['pixel_values'])\n"
        "    raise AssertionError('a missing task was accepted')\n"
        "except ValueError as err:  # hf_tae's TaeError is a ValueError\n"
        "    assert 'forward needs task' in str(err), err\n"
        "print(type(model).__module__)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("transformers_modules.")


# --------------------------------------------------------------------------- errors
def test_task_errors_name_the_heads_and_the_fix():
    model, batch = _model(), _batch()
    with pytest.raises(TaeError, match=r"forward needs task=.*head='shared'"):
        model(batch["pixel_values"])
    bad = batch["task"].clone()
    bad[2] = 4
    expected = (
        r"\[4\] are outside 0\.\.2: the model has 3 task heads but the data has at least 5 "
        r"tasks; rebuild the model with task_names="
    )
    with pytest.raises(TaeError, match=expected):
        model(batch["pixel_values"], task=bad)
    with pytest.raises(TaeError, match=r"task ids \[-1\] are negative"):
        model(batch["pixel_values"], task=torch.full((B,), -1))
    with pytest.raises(TaeError, match="3 entries for a batch of 6"):
        model(batch["pixel_values"], task=torch.tensor([0, 1, 2]))
    with pytest.raises(TaeError, match=r"labels \[7\] are outside 0\.\.3"):
        model(batch["pixel_values"], task=batch["task"], labels=torch.full((B,), 7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head": "multi"}, "head='multi' is not a head kind; use 'per_task'"),
        ({"task_names": []}, r"task_names is \[\]; pass the list of task names"),
        ({"task_names": None}, "task_names is None"),
        ({"task_names": ["a", "a"]}, r"task_names repeats \['a'\]"),
        ({"num_labels": 1}, "num_labels=1: a classifier needs at least two classes"),
        ({"classifier_dropout": 1.0}, r"classifier_dropout=1.0 must be in \[0, 1\)"),
        ({"backbone_config": {"hidden_sizes": [8]}}, "backbone_config has no model_type"),
        ({"backbone_config": {"model_type": "nope"}}, "model_type 'nope', which transformers"),
    ],
)
def test_config_errors(kwargs, message):
    arguments = {"task_names": TASKS, "num_labels": 3, "backbone_config": _resnet(), **kwargs}
    with pytest.raises(TaeError, match=message):
        VisionMultiTaskConfig(**arguments)


def test_backbone_that_does_not_match_the_config_is_refused():
    config = VisionMultiTaskConfig(backbone_config=_resnet(), task_names=TASKS, num_labels=3)
    with pytest.raises(
        TaeError, match="'vit' model but config.backbone_config describes a 'resnet'"
    ):
        VisionForMultiTaskImageClassification(config, backbone=ViTModel(_vit()))


# --------------------------------------------------------------------------- gradients
def test_projected_gradients_match_naive_ones_and_heads_of_other_tasks_get_none():
    model, batch = _model("resnet"), _batch()
    model = model.double()
    batch["pixel_values"] = batch["pixel_values"].double()
    score = GoldLogOddsScore()
    last_conv = "backbone.encoder.stages.1.layers.0.layer.2.convolution.weight"
    include = [model.task_head_parameter_pattern(), last_conv]
    capture = ProjectedGradientCapture(
        model, dim=None, second_stage=False, factor_dim=4, include=include, dtype=torch.float64
    )
    names = [name for name, _ in capture.parameters]
    heads = [n for n in names if n.startswith("heads.")]
    assert len(heads) == 6 and last_conv in names and len(names) == 7
    with capture:
        z = capture.per_example(score(model(**batch), batch))

    params = dict(model.named_parameters())
    scores = score(model(**batch), batch)
    rows = [torch.autograd.grad(scores[e], [params[n] for n in names], retain_graph=True)
            for e in range(B)]  # fmt: skip
    naive = {n: torch.stack([row[i] for row in rows]) for i, n in enumerate(names)}
    reference = sum(naive[n].flatten(1) @ capture.projector.matrix_block(n) for n in names)
    torch.testing.assert_close(z, reference, rtol=1e-9, atol=1e-12)
    for name in heads:  # example e only moves its own task's head
        t = int(name.split(".")[1])
        other = batch["task"] != t
        assert torch.all(z[other][:, capture.projector.offsets[name]] == 0), name
        assert z[~other][:, capture.projector.offsets[name]].abs().amin(1).gt(0).all(), name
        assert torch.all(naive[name][other] == 0), name

    shared = ProjectedGradientCapture(model, dim=16, exclude=model.task_head_parameter_pattern())
    assert not any(n.startswith("heads.") for n, _ in shared.parameters)
    kept = {n for n, _ in shared.parameters}
    assert kept == {n for n in params if not n.startswith("heads.")}


def test_gradient_checkpointing_is_offered_only_by_backbones_that_support_it():
    resnet = _model("resnet")
    assert resnet.supports_gradient_checkpointing is False
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        resnet.activation_checkpointing_enable()
    vit, batch = _model("vit_pooler"), _batch()
    vit.train()  # no dropout in the tiny ViT config: checkpointing must not change gradients
    vit(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in vit.named_parameters()}
    vit.zero_grad()
    assert vit.supports_gradient_checkpointing is True
    vit.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in vit.backbone.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit(**batch).loss.backward()
    for name, param in vit.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)
