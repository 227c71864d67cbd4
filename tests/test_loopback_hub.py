"""Round trips through the loopback Hub with the real huggingface_hub, transformers and datasets.

The session server and its environment come from ``hf_tae.testing.pytest_plugin`` (enabled in
``tests/conftest.py``), so every client below really talks HTTP to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoModel, BertConfig, BertModel

from hf_tae.testing import LoopbackHub


def _request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """Raw HTTP call to the server; returns status, body and headers, also for error statuses."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def test_env_points_clients_at_the_server(loopback_hub: LoopbackHub) -> None:
    assert os.environ["HF_ENDPOINT"] == loopback_hub.endpoint
    assert loopback_hub.endpoint.startswith("http://127.0.0.1:")
    assert os.environ["HF_HUB_DISABLE_XET"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert HfApi().whoami()["name"] == "tae-tester"


def test_apply_env_refuses_after_hf_import() -> None:
    # huggingface_hub is imported by this module, so its endpoint constant is already frozen.
    with pytest.raises(RuntimeError, match="import time"):
        LoopbackHub().apply_env("/nonexistent")


def test_hfapi_upload_list_download(
    loopback_hub: LoopbackHub, hub_repo_id: str, tmp_path: Path
) -> None:
    api = HfApi()
    repo_url = api.create_repo(hub_repo_id)
    assert repo_url.repo_id == hub_repo_id
    folder = tmp_path / "upload"
    (folder / "nested").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello loopback")
    (folder / "nested" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    api.upload_folder(repo_id=hub_repo_id, folder_path=folder)
    api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id=hub_repo_id)

    assert sorted(api.list_repo_files(hub_repo_id)) == [
        ".gitattributes",
        "config.json",
        "nested/weights.bin",
        "notes.txt",
    ]
    tree = {entry.path: entry for entry in api.list_repo_tree(hub_repo_id, recursive=True)}
    assert tree["nested/weights.bin"].lfs is not None  # binary extension went through LFS
    assert tree["notes.txt"].lfs is None
    assert len(api.list_repo_commits(hub_repo_id)) == 3  # seed + folder + file

    assert Path(hf_hub_download(hub_repo_id, "notes.txt")).read_text() == "hello loopback"
    snapshot = Path(snapshot_download(hub_repo_id))
    assert (snapshot / "nested" / "weights.bin").read_bytes() == bytes(range(256)) * 4
    assert loopback_hub.files(hub_repo_id)["config.json"] == b'{"a": 1}'


def test_create_repo_exist_ok_twice(hub_repo_id: str) -> None:
    api = HfApi()
    first = api.create_repo(hub_repo_id, repo_type="dataset", exist_ok=True)
    second = api.create_repo(hub_repo_id, repo_type="dataset", exist_ok=True)
    assert first == second
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(hub_repo_id, repo_type="dataset")
    assert excinfo.value.response.status_code == 409


def test_model_push_to_hub_and_from_pretrained(loopback_hub: LoopbackHub, hub_repo_id: str) -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = BertModel(config)
    model.push_to_hub(hub_repo_id)
    assert "model.safetensors" in loopback_hub.files(hub_repo_id)

    loaded = AutoModel.from_pretrained(hub_repo_id)
    assert type(loaded) is BertModel
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def test_dataset_push_two_configs_and_load(loopback_hub: LoopbackHub, hub_repo_id: str) -> None:
    nodes = Dataset.from_dict({"node": [0, 1, 2], "label": [1, 0, 1]})
    edges = Dataset.from_dict({"src": [0, 1], "dst": [1, 2]})
    nodes.push_to_hub(hub_repo_id, config_name="nodes")
    edges.push_to_hub(hub_repo_id, config_name="edges")
    stored = loopback_hub.files(hub_repo_id, repo_type="dataset")
    assert any(path.startswith("nodes/train-") for path in stored)
    assert any(path.startswith("edges/train-") for path in stored)

    loaded_nodes = load_dataset(hub_repo_id, "nodes", split="train")
    loaded_edges = load_dataset(hub_repo_id, "edges", split="train")
    assert loaded_nodes.to_dict() == nodes.to_dict()
    assert loaded_edges.to_dict() == edges.to_dict()


def test_pinned_revision_and_tag_keep_old_content(hub_repo_id: str) -> None:
    api = HfApi()
    api.create_repo(hub_repo_id)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="value.txt", repo_id=hub_repo_id)
    api.create_tag(hub_repo_id, tag="v1.0", revision=first.oid)
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="value.txt", repo_id=hub_repo_id)

    def read(revision: str | None) -> bytes:
        return Path(hf_hub_download(hub_repo_id, "value.txt", revision=revision)).read_bytes()

    assert read(None) == b"v2"
    assert read(first.oid) == b"v1"
    assert read("v1.0") == b"v1"
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(hub_repo_id, revision="no-such-branch")


def test_stale_parent_commit_is_refused(hub_repo_id: str) -> None:
    api = HfApi()
    api.create_repo(hub_repo_id)
    stale = api.repo_info(hub_repo_id).sha
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=hub_repo_id)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(
            hub_repo_id,
            operations=[CommitOperationAdd(path_in_repo="y.txt", path_or_fileobj=b"y")],
            commit_message="from a stale parent",
            parent_commit=stale,
        )
    assert excinfo.value.response.status_code == 412


def test_missing_repo_raises_repository_not_found(hub_repo_id: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        HfApi().repo_info(hub_repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_repo_id, "config.json")


def test_missing_file_raises_entry_not_found(hub_repo_id: str) -> None:
    api = HfApi()
    api.create_repo(hub_repo_id)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(hub_repo_id, "missing.json")
    assert not api.file_exists(hub_repo_id, "missing.json")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(hub_repo_id, path_in_repo="no/such/folder"))


def test_lfs_upload_with_wrong_sha256_is_rejected(
    loopback_hub: LoopbackHub, hub_repo_id: str
) -> None:
    HfApi().create_repo(hub_repo_id)
    content = b"\x00real weights\x01"
    oid = hashlib.sha256(content).hexdigest()
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 15}]}
    status, body, _ = _request(
        "POST",
        f"{loopback_hub.endpoint}/{hub_repo_id}.git/info/lfs/objects/batch",
        json.dumps(batch).encode(),
        {"Content-Type": "application/vnd.git-lfs+json"},
    )
    assert status == 200
    actions = json.loads(body)["objects"][0]["actions"]

    status, _, _ = _request("PUT", actions["upload"]["href"], b"\x00tampered bytes")
    assert status == 400
    status, _, _ = _request("POST", actions["verify"]["href"], json.dumps({"oid": oid}).encode())
    assert status == 404  # nothing was stored

    commit = "\n".join(
        json.dumps(line)
        for line in (
            {"key": "header", "value": {"summary": "uses a never-uploaded LFS object"}},
            {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid}},
        )
    )
    status, _, _ = _request(
        "POST", f"{loopback_hub.endpoint}/api/models/{hub_repo_id}/commit/main", commit.encode()
    )
    assert status == 422
    assert "w.bin" not in loopback_hub.files(hub_repo_id)

    status, _, _ = _request("PUT", actions["upload"]["href"], content)
    assert status == 200


def test_resolve_headers_and_range(loopback_hub: LoopbackHub, hub_repo_id: str) -> None:
    api = HfApi()
    api.create_repo(hub_repo_id)
    commit = api.upload_file(
        path_or_fileobj=b"0123456789", path_in_repo="d.txt", repo_id=hub_repo_id
    )
    url = f"{loopback_hub.endpoint}/{hub_repo_id}/resolve/main/d.txt"

    status, body, headers = _request("HEAD", url)
    assert (status, body) == (200, b"")
    assert headers["X-Repo-Commit"] == commit.oid
    assert headers["Content-Length"] == "10"
    assert headers["ETag"].strip('"')

    status, body, headers = _request("GET", url, headers={"Range": "bytes=2-4"})
    assert (status, body, headers["Content-Range"]) == (206, b"234", "bytes 2-4/10")

    status, _, headers = _request("GET", url.replace("d.txt", "nope.txt"))
    assert status == 404
    assert headers["X-Error-Code"] == "EntryNotFound"
    assert headers["X-Repo-Commit"] == commit.oid


def test_module_runs_as_a_process(tmp_path: Path) -> None:
    port_file = tmp_path / "endpoint"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hf_tae.testing.loopback_hub",
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],  # importable even without an installed hf_tae
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert process.poll() is None, "server process exited early"
            assert time.monotonic() < deadline, "server did not write its port file"
            time.sleep(0.05)
        endpoint = port_file.read_text().strip()
        status, body, _ = _request("GET", f"{endpoint}/api/whoami-v2")
        assert status == 200 and json.loads(body)["name"] == "tae-tester"
    finally:
        process.terminate()
        stdout, _ = process.communicate(timeout=10)
    assert process.returncode == 0
    assert stdout.strip() == endpoint
