"""merge(): streaming equals in-memory, outputs load in transformers, bad inputs are refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_tae.errors import TaeError
from hf_tae.merging import compute_statistics, merge
from hf_tae.merging.sources import SafetensorsSource


def config(**kw) -> GPT2Config:
    base = dict(n_layer=2, n_embd=8, n_head=2, vocab_size=13, n_positions=16, bos_token_id=0,
                eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2Config(**{**base, **kw})


def finetuned(base: GPT2LMHeadModel, seed: int, scale: float = 0.005) -> GPT2LMHeadModel:
    gen = torch.Generator().manual_seed(seed)
    model = GPT2LMHeadModel(base.config)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def data(seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 13, (4, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return [{"input_ids": ids * mask, "attention_mask": mask,
             "labels": ids.masked_fill(mask == 0, -100)}]  # fmt: skip


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base, three fine-tuned models saved as folders, and their statistics."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config())
    base.save_pretrained(root / "base")
    models, stats = [], []
    for i in range(3):
        model = finetuned(base, seed=i + 1)
        model.save_pretrained(root / f"m{i}")
        s = compute_statistics(model, data(i), ["gram", "kfac", "fisher"])
        stats.append(s.save(root / f"m{i}.stats.safetensors"))
        models.append(model)
    return root, base, models, stats


CASES = [
    ("average", {}),
    ("task_arithmetic", {"lam": 0.4}),
    ("ties", {"density": 0.3, "trim": "global"}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("fisher", {}),
    ("regmean", {"alpha": 0.8}),
    ("mats", {"objective": "kfac", "init": "task_arithmetic", "max_iter": 20}),
]


@pytest.mark.parametrize("method,params", CASES)
def test_streaming_equals_in_memory(family, tmp_path, method, params):
    root, base, models, stats = family
    in_memory = merge(base, models, method, statistics=stats, weights=[1.0, 2.0, 0.5], **params)
    out = tmp_path / "out"
    streamed = merge(root / "base", [root / f"m{i}" for i in range(3)], method, statistics=stats,
                     weights=[1.0, 2.0, 0.5], output_dir=out, max_shard_bytes=2000, **params)  # fmt: skip
    assert streamed.state_dict is None and len(list(out.glob("model-*.safetensors"))) > 1
    source = SafetensorsSource(out, "out")
    assert sorted(source.names()) == sorted(in_memory.state_dict)
    for name, tensor in in_memory.state_dict.items():
        assert torch.equal(source.get(name), tensor), name
    assert streamed.log == in_memory.log
    loaded = GPT2LMHeadModel.from_pretrained(out)  # config copied; tied lm_head restored
    assert torch.equal(loaded.lm_head.weight, in_memory.state_dict["transformer.wte.weight"])
    record = json.loads((out / "merge_config.json").read_text())
    assert record["merge_method"] == method and record["weights"] == [1.0, 2.0, 0.5]


def test_data_aware_merges_log_fallbacks_and_residuals(family):
    root, base, models, stats = family
    result = merge(base, models, "mats", statistics=stats, objective="regmean", max_iter=5)
    info = result.log["transformer.h.0.attn.c_attn.weight"]
    assert info["iterations"] <= 5 and info["final_residual"] < info["initial_residual"]
    assert result.log["transformer.h.0.ln_1.weight"]["fallback"] == "average"  # A.8
    assert result.log["transformer.wte.weight"]["fallback"] == "average"  # tied to lm_head


def test_bad_inputs_name_the_tensor_and_the_fix(family, tmp_path):
    root, base, models, stats = family
    state = dict(models[1].state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(
        TaeError, match=r"'transformer\.h\.1\.mlp\.c_fc\.bias' is missing from model 1"
    ):
        merge(base, [models[0], state], "average")
    other = GPT2LMHeadModel(config(n_embd=12))
    with pytest.raises(TaeError, match="another architecture.*n_embd"):
        merge(base, [models[0], other], "average")
    with pytest.raises(TaeError, match="different weight 'transformer.wte.weight'"):
        merge(base, models, "regmean", statistics=[stats[1], stats[0], stats[2]])
    with pytest.raises(TaeError, match="needs statistics"):
        merge(base, models, "regmean")
    with pytest.raises(TaeError, match="needs 'kfac'"):
        gram_only = compute_statistics(models[0], data(0), ["gram"])
        merge(base, models[:1], "mats", objective="kfac", statistics=[gram_only])
    torch.manual_seed(5)
    stranger = GPT2LMHeadModel(config())  # same architecture, another initialisation
    with pytest.raises(TaeError, match="not fine-tuned from this base"):
        merge(stranger, models, "task_arithmetic")
    with pytest.raises(TaeError, match="needs base"):
        merge(None, models, "ties")
    with pytest.raises(TaeError, match="already exists"):
        (tmp_path / "taken").mkdir()
        merge(base, models, "average", output_dir=tmp_path / "taken")
    nan = dict(models[2].state_dict())
    nan["transformer.ln_f.bias"] = torch.full_like(nan["transformer.ln_f.bias"], float("nan"))
    with pytest.raises(TaeError, match=r"'transformer\.ln_f\.bias' of model 1 .*NaN"):
        merge(base, [models[0], nan], "average")
    assert not (tmp_path / "failed").exists()
    with pytest.raises(TaeError):
        merge(base, [models[0], nan], "average", output_dir=tmp_path / "failed")
    assert not (tmp_path / "failed").exists()  # nothing half-written


def test_output_dtype_is_written_and_recorded(family, tmp_path):
    root, base, models, stats = family
    merge(root / "base", [root / "m0", root / "m1"], "average", dtype=torch.bfloat16,
          output_dir=tmp_path / "bf16")  # fmt: skip
    out = SafetensorsSource(tmp_path / "bf16", "out")
    assert {out.get(n).dtype for n in out.names()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sweep_picks_the_best_point_and_reads_statistics_once(family, monkeypatch):
    from hf_tae.merging import MergeStatistics, merge_sweep

    root, base, models, stats = family
    # the score peaks at λ = 0.5: distance of the merged c_fc weight to θ0 + 0.5 Σ τ_i
    name = "transformer.h.0.mlp.c_fc.weight"
    target = base.state_dict()[name] + 0.5 * sum(
        m.state_dict()[name] - base.state_dict()[name] for m in models
    )
    reads = []
    original = MergeStatistics._raw

    def spy(self, key):  # count reads from the files, not from memory
        if key not in self._tensors:
            reads.append((id(self), key))
        return original(self, key)

    monkeypatch.setattr(MergeStatistics, "_raw", spy)
    result = merge_sweep(base, models, "mats", [{"init_lambda": x} for x in (0.2, 0.5, 0.8)],
                   lambda sd: -float((sd[name] - target).norm()), statistics=stats,
                   objective="regmean", max_iter=0)  # fmt: skip
    assert result.best_params == {"init_lambda": 0.5}
    assert [p for p, _ in result.scores] == [{"init_lambda": x} for x in (0.2, 0.5, 0.8)]
    assert reads and len(reads) == len(set(reads))  # each statistic read once for the grid
