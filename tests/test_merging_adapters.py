"""peft adapters: LoRA merged in full space (vs. peft's own merge_and_unload), rank-r
refactoring, (IA)³ on l − 1, and refused variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from hf_tae.errors import TaeError
from hf_tae.merging import compute_statistics, merge

CONFIG = dict(n_layer=2, n_embd=8, n_head=2, vocab_size=13, n_positions=16, bos_token_id=0,
              eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
ADAPTED = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]


def fresh_base(root) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(root / "base")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**CONFIG)).save_pretrained(root / "base")
    configs = [
        LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                   init_lora_weights=False),
        LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                   init_lora_weights=False, use_rslora=True, rank_pattern={"c_fc": 1},
                   alpha_pattern={"c_attn": 5}),
    ]  # fmt: skip
    dense = []
    for i, cfg in enumerate(configs):
        peft_model = get_peft_model(fresh_base(root).double(), cfg)  # float64: no near-ties
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.05 * torch.randn_like(p))
        peft_model.save_pretrained(root / f"lora{i}")
        dense.append(peft_model.merge_and_unload().state_dict())  # peft's own ΔW = s·B·A
    return root, dense


def test_lora_full_space_task_arithmetic_equals_dense_delta(loras):
    root, dense = loras
    base = fresh_base(root).state_dict()
    result = merge(root / "base", [root / "lora0", root / "lora1"], "task_arithmetic", lam=0.7)
    for name, tensor in result.state_dict.items():
        expected = base[name] + 0.7 * sum(d[name].float() - base[name] for d in dense)
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    for name in ADAPTED:  # no A/B cross terms: the ΔWs really add up
        assert not torch.allclose(result.state_dict[name], base[name])


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("average", {})])
def test_lora_merge_equals_merge_of_merged_models(loras, method, params):
    root, dense = loras
    adapters = merge(root / "base", [root / "lora0", root / "lora1"], method, **params)
    full = merge(root / "base", dense, method, **params)
    for name, tensor in full.state_dict.items():
        torch.testing.assert_close(adapters.state_dict[name], tensor, rtol=1e-5, atol=1e-6)


def test_lora_refactored_to_rank_r(loras, tmp_path):
    root, dense = loras
    full = merge(root / "base", [root / "lora0", root / "lora1"], "task_arithmetic").state_dict
    base = fresh_base(root).state_dict()
    # rank 5 >= rank(ΔW_0 + ΔW_1): the adapter reproduces the full-space merge
    merge(root / "base", [root / "lora0", root / "lora1"], "task_arithmetic",
          output_dir=tmp_path / "r5", lora_rank=5)  # fmt: skip
    loaded = PeftModel.from_pretrained(fresh_base(root), tmp_path / "r5").merge_and_unload()
    for name, tensor in loaded.state_dict().items():
        if name in full:
            torch.testing.assert_close(tensor, full[name], rtol=1e-5, atol=1e-6)
    # rank 1: the error is the best rank-1 error (Eckart-Young)
    result = merge(root / "base", [root / "lora0", root / "lora1"], "task_arithmetic",
                   output_dir=tmp_path / "r1", lora_rank=1)  # fmt: skip
    for name in ADAPTED:
        s = torch.linalg.svdvals((full[name] - base[name]).double())
        expected = (s[1:].norm() / s.norm()).item()
        assert result.log["lora_svd_relative_error"][name] == pytest.approx(expected, rel=1e-4)


def test_refused_lora_variants(loras, tmp_path):
    root, _ = loras
    dora = get_peft_model(fresh_base(root), LoraConfig(r=2, target_modules=["c_attn"],
                                                       fan_in_fan_out=True, use_dora=True))  # fmt: skip
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(TaeError, match="use_dora.*DoRA"):
        merge(root / "base", [root / "lora0", tmp_path / "dora"], "average")
    with pytest.raises(TaeError, match="LoRA adapter; pass base"):
        merge(None, [root / "lora0"], "average")
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(**{**CONFIG, "n_embd": 12})).save_pretrained(tmp_path / "other")
    with pytest.raises(TaeError, match="another base model|shape"):
        merge(tmp_path / "other", [root / "lora0"], "average")
    with pytest.raises(TaeError, match="merge_and_unload"):
        compute_statistics(PeftModel.from_pretrained(fresh_base(root), root / "lora0"),
                           [{"input_ids": torch.ones(1, 3, dtype=torch.long)}])  # fmt: skip


@pytest.fixture(scope="module")
def ia3s(loras):
    root, _ = loras
    models = []
    for i in range(2):
        torch.manual_seed(10 + i)
        cfg = IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                        fan_in_fan_out=True)  # fmt: skip
        model = get_peft_model(fresh_base(root), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
        model.save_pretrained(root / f"ia3_{i}")
        models.append(model)
    return root, models


def ia3_vectors(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model.").removesuffix(".default"): p.detach().clone()
            for n, p in model.named_parameters() if "ia3_l" in n}  # fmt: skip


def test_ia3_task_arithmetic_on_l_minus_one(ia3s, tmp_path):
    root, models = ia3s
    vecs = [ia3_vectors(m) for m in models]
    merge(None, [root / "ia3_0", root / "ia3_1"], "task_arithmetic", lam=0.5,
          output_dir=tmp_path / "ia3")  # fmt: skip
    merged = ia3_vectors(PeftModel.from_pretrained(fresh_base(root), tmp_path / "ia3"))
    assert set(merged) == set(vecs[0])
    for name, v in merged.items():
        torch.testing.assert_close(v, 1 + 0.5 * ((vecs[0][name] - 1) + (vecs[1][name] - 1)))


def test_ia3_block_fisher_cg_equals_dense_solve(ia3s):
    root, models = ia3s
    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, 13, (40, 5), generator=gen)
    }  # Fisher blocks of full rank
    batch["labels"] = batch["input_ids"]
    stats = [
        compute_statistics(m, [batch], ["fisher_block"], fisher_block="c_fc.ia3_l") for m in models
    ]
    result = merge(None, [root / "ia3_0", root / "ia3_1"], "mats", statistics=stats,
                   objective="fisher_block", init="average", max_iter=200, rtol=1e-12)  # fmt: skip
    vecs = [ia3_vectors(m) for m in models]
    for name, merged in result.state_dict.items():
        if "c_attn" in name:  # no statistics: the average (A.8)
            assert result.log[name]["fallback"] == "average"
            continue
        fs = [s.for_tensor(name).fisher_block.double().numpy() for s in stats]
        rhs = sum(f @ v[name].double().numpy().ravel() for f, v in zip(fs, vecs, strict=True))
        expected = np.linalg.solve(sum(fs), rhs).reshape(merged.shape)
        np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-5, atol=1e-6)
