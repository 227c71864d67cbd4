"""Models named by Hub repo id (``user/name[@revision]``) in ``hf_tae.merge`` and the YAML
config, pulled for real over HTTP from the session's loopback Hub: the merge equals the merge of
the same local folders, a pinned revision reads the old weights, only safetensors and config
files are downloaded, and a missing repo or revision is a clear error."""

import os

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hf_tae import TaeError
from hf_tae.merging import merge
from hf_tae.merging.cli import main as merge_cli

SHAPES = {"embed.weight": (32, 8), "layer.weight": (8, 8), "layer.bias": (8,)}


def _folder(path, seed, base=None):
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        k: torch.randn(s, generator=gen) * (0.05 if base else 1.0) for k, s in SHAPES.items()
    }
    if base is not None:
        tensors = {k: base[k] + v for k, v in tensors.items()}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "toy", "hidden_size": 8}')
    (path / "pytorch_model.bin").write_bytes(b"not a pickle a merge may read")
    return path, tensors


def _push(folder, repo_id):
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder))


@pytest.fixture
def hub_models(tmp_path, hub_repo_id):
    base_dir, base = _folder(tmp_path / "base", 0)
    folders = [base_dir] + [_folder(tmp_path / f"m{i}", i + 1, base)[0] for i in range(2)]
    ids = [f"{hub_repo_id}-{name}" for name in ("base", "m0", "m1")]
    for folder, repo_id in zip(folders, ids, strict=True):
        _push(folder, repo_id)
    return folders, ids


def test_hub_ids_merge_like_the_local_folders(hub_models, tmp_path):
    folders, ids = hub_models
    local = merge(folders[0], folders[1:], "task_arithmetic", lam=0.5).state_dict
    result = merge(ids[0], ids[1:], "task_arithmetic", lam=0.5, output_dir=tmp_path / "out")
    pulled = load_file(tmp_path / "out" / "model.safetensors")
    assert pulled.keys() == local.keys()
    for name in local:
        assert torch.equal(pulled[name], local[name]), name
    assert (tmp_path / "out" / "config.json").is_file()  # the base's config came along
    assert not result.skipped


def test_only_safetensors_and_config_files_are_downloaded(hub_models):
    from hf_tae.merging.sources import download_model

    _, ids = hub_models
    snapshot = download_model(ids[1], "model 0")
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    assert os.environ["HF_ENDPOINT"].startswith("http://127.0.0.1:")  # really the loopback Hub


def test_pinned_revision_reads_the_old_weights_from_yaml(hub_models, tmp_path):
    folders, ids = hub_models
    old = HfApi().list_repo_commits(ids[1])[0].commit_id
    _, newer = _folder(tmp_path / "newer", 99, load_file(folders[0] / "model.safetensors"))
    _push(tmp_path / "newer", ids[1])  # main moves on; the pin must not
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: average\nmodels:\n  - model: {ids[1]}@{old}\n"
                      f"  - model: {ids[2]}\n")  # fmt: skip
    assert merge_cli([str(config), str(tmp_path / "pinned")]) == 0
    merged = load_file(tmp_path / "pinned" / "model.safetensors")
    a, b = (load_file(f / "model.safetensors") for f in folders[1:])
    for name in SHAPES:
        expected = ((a[name].double() + b[name].double()) / 2).float()
        assert torch.equal(merged[name], expected), name
        assert not torch.equal(merged[name], ((newer[name].double() + b[name]) / 2).float())


def test_missing_repo_or_revision_is_a_clear_error(hub_models, hub_repo_id):
    _, ids = hub_models
    with pytest.raises(TaeError, match="(?s)could not download 'tae-tester/.*-nope'.*local folder"):
        merge(None, [f"{hub_repo_id}-nope", ids[1]], "average")
    with pytest.raises(TaeError, match="revision 'no-such-branch'"):
        merge(None, [f"{ids[1]}@no-such-branch", ids[2]], "average")
