"""``hf-tae merge config.yaml``: mergekit-like YAML to the same result as the Python API."""

from __future__ import annotations

import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from hf_tae.merging import compute_statistics, merge
from hf_tae.merging.cli import main
from hf_tae.merging.sources import SafetensorsSource


def test_cli_merge_matches_python_api(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=16,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    base = GPT2LMHeadModel(cfg)
    base.save_pretrained(tmp_path / "base")
    batch = {"input_ids": torch.randint(1, 13, (3, 5))}
    entries = []
    for i in range(2):
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.003 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"m{i}")
        compute_statistics(model, [batch], ["gram"]).save(tmp_path / f"s{i}.safetensors")
        entries.append({"model": str(tmp_path / f"m{i}"),
                        "parameters": {"weight": 1.0 + i, "statistics": str(tmp_path / f"s{i}.safetensors")}})  # fmt: skip
    config = {"merge_method": "mats", "base_model": str(tmp_path / "base"), "models": entries,
              "parameters": {"objective": "regmean", "init_lambda": 0.3, "max_iter": 10}}  # fmt: skip
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "merge.yaml"), str(tmp_path / "out")]) == 0
    expected = merge(tmp_path / "base", [tmp_path / "m0", tmp_path / "m1"], "mats",
                     statistics=[tmp_path / "s0.safetensors", tmp_path / "s1.safetensors"],
                     weights=[1.0, 2.0], objective="regmean", init_lambda=0.3, max_iter=10)  # fmt: skip
    out = SafetensorsSource(tmp_path / "out", "out")
    for name, tensor in expected.state_dict.items():
        assert torch.equal(out.get(name), tensor)

    config["parameters"]["lambda"] = 0.5  # mergekit's name; mats has no lam: a clear error
    config["models"][0]["parameters"]["density"] = 0.2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "bad.yaml"), str(tmp_path / "out2")]) == 2
    assert "models[0].parameters has ['density']" in capsys.readouterr().err
    del config["models"][0]["parameters"]["density"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "bad.yaml"), str(tmp_path / "out2")]) == 2
    assert "has no parameter(s) ['lam']" in capsys.readouterr().err
