"""Shard-level resume: a merge killed after its first shard reached the disk is resumed by the
next merge of the same inputs, which merges only the tensors not yet in a finished shard and
ends with bitwise the files of an uninterrupted merge; a partial folder left by another merge
is not reused."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from merging_helpers import SHAPES, base_and_tuned
from safetensors.torch import load_file

from hf_tae.merging import merge, registry

# embed.weight (4 KiB), the first name in order, fills the first shard alone
OPTIONS = {"max_shard_bytes": 2048, "density": 0.5}


@pytest.fixture
def models(tmp_path):
    base, tuned = base_and_tuned(tmp_path)
    return str(base), [str(t) for t in tuned]


@pytest.fixture
def merged_names(monkeypatch):
    """The tensors the TIES function is called on in this process, in order."""
    spec, names = registry.get_method("ties"), []

    def counting(block, **params):
        names.append(block.name)
        return spec.fn(block, **params)

    monkeypatch.setitem(registry.METHODS, "ties", dataclasses.replace(spec, fn=counting))
    return names


def _kill_after_first_shard(base, tuned, out, **options):
    """Run the merge in a subprocess that dies (``os._exit``) right after the first shard."""
    script = textwrap.dedent(f"""
        import os
        from hf_tae.merging import merge
        from hf_tae.merging.writer import ShardWriter
        flush = ShardWriter._flush
        def die(self):
            flush(self)
            os._exit(9)
        ShardWriter._flush = die
        merge({base!r}, {tuned!r}, "ties", output_dir={str(out)!r}, **{options!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    partial = out.with_name(f".{out.name}.partial")
    progress = json.loads((partial / ".progress.json").read_text())
    assert [list(s["tensors"]) for s in progress["shards"]] == [["embed.weight"]]
    return partial


def _same_files(folder, reference):
    """Every tensor equal (dtype and bits), then every file byte for byte (index included)."""
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in names:
        if name.endswith(".safetensors"):
            ours, theirs = load_file(folder / name), load_file(reference / name)
            assert ours.keys() == theirs.keys(), name
            for k in ours:
                assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_merge_killed_after_the_first_shard_resumes_from_it(models, tmp_path, merged_names):
    base, tuned = models
    merge(base, tuned, "ties", output_dir=tmp_path / "reference", **OPTIONS)
    order = list(merged_names)
    assert sorted(order) == sorted(SHAPES) and order[0] == "embed.weight"
    merged_names.clear()
    out = tmp_path / "merged"
    partial = _kill_after_first_shard(base, tuned, out, **OPTIONS)
    first_shard = (partial / ".shard-00000.safetensors").stat().st_mtime_ns
    merge(base, tuned, "ties", output_dir=out, **OPTIONS)
    assert merged_names == order[1:]  # the first shard was kept, not merged again
    assert not partial.exists() and not (out / ".progress.json").exists()
    assert (out / "model-00001-of-00003.safetensors").stat().st_mtime_ns == first_shard
    _same_files(out, tmp_path / "reference")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES)


def test_a_partial_folder_of_another_merge_is_not_reused(models, tmp_path, merged_names):
    base, tuned = models
    out = tmp_path / "merged"
    partial = _kill_after_first_shard(base, tuned, out, **OPTIONS)
    (partial / "stray.txt").write_text("left by the killed merge")
    other = {**OPTIONS, "density": 0.7}  # another fingerprint
    merge(base, tuned, "ties", output_dir=out, **other)
    assert sorted(merged_names) == sorted(SHAPES)  # every tensor merged again
    assert not partial.exists()
    merge(base, tuned, "ties", output_dir=tmp_path / "reference", **other)
    _same_files(out, tmp_path / "reference")
    assert not (out / "stray.txt").exists()
