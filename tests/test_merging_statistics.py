"""Statistics hooks against hand computation and per-example autograd loops."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from hf_tae.errors import TaeError
from hf_tae.merging import MergeStatistics, compute_statistics


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=16,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config).double()


def padded_batch(lengths=(5, 3, 4), vocab=13, seed=1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), t), generator=gen)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # right padding with token 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def unpadded(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    out = []
    for e in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][e].sum())
        out.append({k: v[e : e + 1, :n] for k, v in batch.items()})
    return out


def test_input_gram_is_xtx_over_unpadded_tokens():
    model, batch = tiny_gpt2(), padded_batch()
    stats = compute_statistics(model, [batch], ["gram"])
    # reference: each example alone, without padding, every row of every module's input
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0][0]))
             for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]  # fmt: skip
    with torch.no_grad():
        for example in unpadded(batch):
            model(**example)
    for h in hooks:
        h.remove()
    assert set(stats.header["layouts"]) == set(seen)  # the tied lm_head is not tracked
    for name, rows in seen.items():
        x = torch.cat(rows)
        torch.testing.assert_close(stats.for_tensor(f"{name}.weight").input_gram.double(),
                                   x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)  # fmt: skip
        assert stats.header["tokens"][name] == 12
    assert stats.layout("transformer.h.0.attn.c_attn.weight") == "conv1d"
    assert stats.header["n_examples"] == 3


def test_empirical_fisher_and_kfac_match_per_example_autograd():
    model, batch = tiny_gpt2(), padded_batch()
    stats = compute_statistics(model, [batch], ["fisher", "kfac"], reduction="mean")
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    module = model.transformer.h[0].mlp.c_fc
    g_sum, count = 0, 0
    for example in unpadded(batch):
        out = {}

        def keep(m, i, o, out=out):
            o.retain_grad()
            out["y"] = o

        h = module.register_forward_hook(keep)
        loss = model(**example).loss  # mean token NLL: log p = -loss (MaTS)
        h.remove()
        model.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            fisher[n] += p.grad**2
        g = out["y"].grad[0]
        g_sum, count = g_sum + g.T @ g, count + g.shape[0]
    for n in fisher:
        torch.testing.assert_close(stats.for_tensor(n).fisher.double(), fisher[n] / 3,
                                   rtol=1e-4, atol=1e-10)  # fmt: skip
    got = stats.for_tensor("transformer.h.0.mlp.c_fc.weight").outgrad_gram.double()
    torch.testing.assert_close(got, g_sum / count, rtol=1e-4, atol=1e-10)
    assert stats.header["fisher"] == "empirical" and stats.header["reduction"] == "mean"


def test_true_fisher_of_a_softmax_classifier_matches_its_expectation():
    """Sampled-label Fisher → Σ_y p_y (∇ log p_y)², computed exactly over the classes."""

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 4).double()

        def forward(self, x, labels=None):
            return type("Out", (), {"logits": self.head(x)})()

    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(1, 3, dtype=torch.float64)
    logp = torch.log_softmax(model.head(x), -1)[0]
    exact = torch.zeros_like(model.head.weight)
    for y in range(4):
        (g,) = torch.autograd.grad(logp[y], model.head.weight, retain_graph=True)
        exact += logp[y].exp() * g**2
    data = [{"x": x.repeat(400, 1), "labels": torch.zeros(400, dtype=torch.long)}]
    stats = compute_statistics(model, data, ["fisher"], fisher="true", max_examples=None)
    torch.testing.assert_close(stats.for_tensor("head.weight").fisher.double(), exact,
                               rtol=0.15, atol=1e-3)  # fmt: skip


def test_t5_encoder_decoder_masks():
    torch.manual_seed(0)
    config = T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                      num_decoder_layers=1, num_heads=2, decoder_start_token_id=0,
                      pad_token_id=0, dropout_rate=0.0)  # fmt: skip
    model = T5ForConditionalGeneration(config)
    batch = padded_batch(lengths=(6, 2), vocab=20)
    batch["labels"] = torch.tensor([[3, 4, 5], [6, -100, -100]])
    stats = compute_statistics(model, [batch], ["gram"])
    tokens = stats.header["tokens"]
    assert tokens["encoder.block.0.layer.0.SelfAttention.q"] == 8
    assert tokens["decoder.block.0.layer.0.SelfAttention.q"] == 4
    assert tokens["decoder.block.0.layer.1.EncDecAttention.q"] == 4
    assert tokens["decoder.block.0.layer.1.EncDecAttention.k"] == 8  # reads the encoder output
    assert "lm_head" not in tokens  # tied to shared.weight: averaged (A.8)


def test_save_load_roundtrip_and_checks(tmp_path):
    model, batch = tiny_gpt2(), padded_batch()
    stats = compute_statistics(model, [batch], ["gram", "fisher"], model_id="tiny/gpt2")
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = MergeStatistics.load(path)
    assert loaded.header == stats.header and loaded.keys() == stats.keys()
    name = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(
        loaded.for_tensor(name).input_gram, stats.for_tensor(name).input_gram
    )
    weight = model.transformer.h[0].attn.c_attn.weight.detach()
    loaded.check_tensor(name, weight.float(), "model 0")  # fp32 copy of the same weight passes
    with pytest.raises(TaeError, match="c_attn.weight.*another model"):
        loaded.check_tensor(name, weight + 1e-3, "model 0")
    other = compute_statistics(tiny_gpt2(seed=1), [batch], ["gram"])
    assert other.header["data_hash"] == stats.header["data_hash"]
    assert other.header["config_hash"] == stats.header["config_hash"]
    with pytest.raises(TaeError, match="another config"):
        loaded.check_config("0123456789abcdef", "model 0")


def test_nan_statistics_raise_naming_the_tensor(tmp_path):
    model, batch = tiny_gpt2(), padded_batch()
    stats = compute_statistics(model, [batch], ["gram"])
    key = "transformer.h.0.mlp.c_fc.input_gram"
    stats._tensors[key] = torch.full_like(stats._tensors[key], float("nan"))
    path = stats.save(tmp_path / "s.safetensors")
    with pytest.raises(TaeError, match=r"mlp\.c_fc\.input_gram.*NaN"):
        MergeStatistics.load(path).for_tensor("transformer.h.0.mlp.c_fc.weight")
    with pytest.raises(TaeError, match="merge statistics file"):
        (tmp_path / "bad.safetensors").write_bytes(b"")
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        MergeStatistics.load(tmp_path / "bad.safetensors")


def test_hub_round_trip_and_pinned_revision(hub_repo_id):
    model, batch = tiny_gpt2(), padded_batch()
    first = compute_statistics(model, [batch], ["gram"], model_id="tiny/gpt2")
    commit = first.push_to_hub(hub_repo_id)
    loaded = MergeStatistics.load(hub_repo_id)
    assert loaded.header == first.header
    name = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(
        loaded.for_tensor(name).input_gram, first.for_tensor(name).input_gram
    )
    compute_statistics(model, [padded_batch(seed=2)], ["gram"]).push_to_hub(hub_repo_id)
    assert MergeStatistics.load(hub_repo_id).header["data_hash"] != first.header["data_hash"]
    pinned = MergeStatistics.load(hub_repo_id, revision=commit.oid)
    assert pinned.header["data_hash"] == first.header["data_hash"]
    with pytest.raises(TaeError, match="could not download"):
        MergeStatistics.load(hub_repo_id, revision="no-such-branch")
