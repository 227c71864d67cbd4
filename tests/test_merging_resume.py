"""Restartable merges: a merge that fails or is killed midway leaves no output, the next one
gives bitwise the tensors of an uninterrupted merge, and a rerun of a finished merge of the
same inputs is skipped while any change of input or option merges again."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from merging_helpers import SHAPES, base_and_tuned
from safetensors.torch import load_file, save_file

from hf_tae import TaeError
from hf_tae.merging import merge
from hf_tae.merging.cli import main as merge_cli
from hf_tae.merging.writer import ShardWriter


@pytest.fixture
def models(tmp_path):
    return base_and_tuned(tmp_path)


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# small shards: the crash comes after shards have reached the disk
OPTIONS = {"max_shard_bytes": 2048, "density": 0.5}


def test_exception_after_the_first_tensor_leaves_nothing_and_the_rerun_is_exact(
    models, tmp_path, monkeypatch
):
    base, tuned = models
    reference = merge(base, tuned, "ties", output_dir=tmp_path / "reference", **OPTIONS)
    assert len(list(reference.output_dir.glob("model-*.safetensors"))) > 1  # sharded
    original, calls = ShardWriter.add, []

    def crash(self, name, tensor):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", crash)
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge(base, tuned, "ties", output_dir=out, **OPTIONS)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "m0", "m1", "m2", "reference"]
    monkeypatch.setattr(ShardWriter, "add", original)
    merge(base, tuned, "ties", output_dir=out, **OPTIONS)
    _same(_tensors(out), _tensors(tmp_path / "reference"))
    assert (out / "model.safetensors.index.json").read_text() == (
        tmp_path / "reference" / "model.safetensors.index.json"
    ).read_text()


def test_a_killed_merge_leaves_a_partial_folder_the_next_merge_replaces(models, tmp_path):
    base, tuned = models
    out = tmp_path / "merged"
    script = textwrap.dedent(f"""
        import os
        from hf_tae.merging import merge
        from hf_tae.merging.writer import ShardWriter
        flush = ShardWriter._flush
        def die(self):
            flush(self)
            os._exit(9)  # killed outright after the first shard reached the disk
        ShardWriter._flush = die
        merge({str(base)!r}, {[str(m) for m in tuned]!r}, "ties", output_dir={str(out)!r},
              max_shard_bytes=2048, density=0.5)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    partial = tmp_path / ".merged.partial"
    assert not out.exists() and list(partial.glob(".shard-*.safetensors"))
    merge(base, tuned, "ties", output_dir=out, **OPTIONS)
    assert not partial.exists()
    merge(base, tuned, "ties", output_dir=tmp_path / "reference", **OPTIONS)
    _same(_tensors(out), _tensors(tmp_path / "reference"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (tmp_path / "reference").iterdir()
    )


def test_a_finished_merge_is_skipped_and_any_change_merges_again(models, tmp_path):
    base, tuned = models
    out = tmp_path / "merged"
    first = merge(base, tuned, "task_arithmetic", lam=0.5, output_dir=out)
    assert not first.skipped
    mtime = os.stat(out / "model.safetensors").st_mtime_ns
    again = merge(base, tuned, "task_arithmetic", lam=0.5, output_dir=out, skip_if_finished=True)
    assert again.skipped and os.stat(out / "model.safetensors").st_mtime_ns == mtime
    with pytest.raises(TaeError, match="already exists"):  # another option: not this merge
        merge(base, tuned, "task_arithmetic", lam=0.7, output_dir=out, skip_if_finished=True)
    changed = merge(base, tuned, "task_arithmetic", lam=0.7, output_dir=out, overwrite=True,
                    skip_if_finished=True)  # fmt: skip
    assert not changed.skipped
    expected = {k: load_file(base / "model.safetensors")[k] for k in SHAPES}
    models_ = [load_file(m / "model.safetensors") for m in tuned]
    for k in SHAPES:  # θ0 + λ Σ τ_i, by hand
        tau = sum(m[k].double() - expected[k].double() for m in models_)
        ref = (expected[k].double() + 0.7 * tau).float()
        torch.testing.assert_close(_tensors(out)[k], ref, rtol=0, atol=1e-6)
    # a model saved again (new file) is a new input
    save_file(load_file(tuned[0] / "model.safetensors"), str(tuned[0] / "model.safetensors"))
    with pytest.raises(TaeError, match="already exists"):
        merge(base, tuned, "task_arithmetic", lam=0.7, output_dir=out, skip_if_finished=True)


def test_cli_rerun_keeps_the_finished_merge(models, tmp_path, capsys):
    base, tuned = models
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: average\nbase_model: {base}\nmodels:\n"
                      + "".join(f"  - model: {m}\n" for m in tuned))  # fmt: skip
    assert merge_cli([str(config), str(tmp_path / "out")]) == 0
    assert merge_cli([str(config), str(tmp_path / "out")]) == 0
    assert "already holds this merge" in capsys.readouterr().out
    config.write_text(config.read_text().replace("average", "task_arithmetic"))
    assert merge_cli([str(config), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
