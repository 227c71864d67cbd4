"""The Hub: MultitaskTrainer pushes with hf_tae's card, load_meta_init (hf_tae, remote code, peft
adapters, pinned revisions, clear errors) and publish / ``hf-tae publish``, all against the
loopback Hub of the pytest plugin."""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import save_file

from hf_tae import (
    GradientStore,
    MultitaskTrainer,
    MultitaskTrainingArguments,
    SignConfig,
    SignForMultiTaskNodeClassification,
    TaeError,
)
from hf_tae.hub import card_metrics, load_meta_init, publish
from hf_tae.testing.loopback_hub import DEFAULT_USER, DUMMY_TOKEN

NUM_HOPS = 2


def _repo_id(name: str) -> str:
    return f"{DEFAULT_USER}/{name}-{uuid.uuid4().hex[:8]}"


def _run_python(code: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the loopback Hub's environment is inherited)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _sign_model(in_features: int, task_names: list[str], seed: int = 0):
    torch.manual_seed(seed)
    config = SignConfig(in_features=in_features, num_hops=NUM_HOPS, hidden_size=8,
                        task_names=task_names, dropout=0.1, input_dropout=0.1)  # fmt: skip
    return SignForMultiTaskNodeClassification(config)


def _tiny_store(path, task_names: list[str], dim: int = 4) -> GradientStore:
    rng = np.random.default_rng(0)
    n = 2 * len(task_names) * 3
    store = GradientStore.create(path, {"task_names": task_names}, dim=dim)
    store.write_shard(
        {
            "split": np.repeat(["train", "validation"], n // 2),
            "task": np.tile(np.repeat(np.arange(len(task_names)), 3), 2),
            "example_id": np.tile(np.arange(3), 2 * len(task_names)),
            "label": rng.integers(0, 2, n).astype(np.float32),
            "score": rng.normal(size=n).astype(np.float32),
            "grad": rng.normal(size=(n, dim)).astype(np.float32),
        }
    )
    return store.finalize()


@pytest.fixture(scope="module")
def graph(tiny_graph):
    return tiny_graph


@pytest.fixture(scope="module")
def pushed(graph, tmp_path_factory):
    """A MultitaskTrainer trained one epoch and pushed with push_to_hub=True, plus reference
    weights and outputs on fixed inputs saved to a safetensors file for the subprocesses."""
    repo_id = _repo_id("meta-init")
    gradient_repo = f"{repo_id}-gradients"
    tmp = tmp_path_factory.mktemp("pushed")
    args = MultitaskTrainingArguments(
        output_dir=str(tmp / "out"), num_train_epochs=1, learning_rate=1e-2,
        per_device_train_batch_size=64, per_device_eval_batch_size=512, use_cpu=True,
        disable_tqdm=True, seed=0, save_strategy="no", load_best_model_at_end=False,
        push_to_hub=True, hub_model_id=repo_id,
    )  # fmt: skip
    model = _sign_model(graph.x.shape[1], graph.task_names)
    trainer = MultitaskTrainer(model=model, args=args, task_set=graph.task_set(NUM_HOPS))
    trainer.train()
    trainer.evaluate_tasks("test")
    commit = trainer.push_to_hub(gradient_store_repo=gradient_repo)
    model.eval()
    inputs = torch.randn(
        5, NUM_HOPS + 1, graph.x.shape[1], generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits = model(inputs).logits
    reference = {f"w.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file({**reference, "inputs": inputs, "logits": logits}, str(tmp / "reference.safetensors"))
    return {
        "repo_id": repo_id, "commit": commit, "trainer": trainer, "tmp": tmp,
        "reference": str(tmp / "reference.safetensors"), "gradient_repo": gradient_repo,
    }  # fmt: skip


def test_push_writes_hf_tae_card_with_tasks_metrics_and_tags(pushed, graph, loopback_hub):
    repo_id = pushed["repo_id"]
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "hf_tae"
    assert {"hf-tae", "multitask", "task-affinity", "transformers"} <= set(card.data.tags)
    metrics = card_metrics(pushed["trainer"].state.log_history)
    results = {(r.task_name, r.dataset_split, r.metric_type): r.metric_value
               for r in card.data.eval_results}  # fmt: skip
    for task in graph.task_names:
        assert f"`{task}`" in card.text
        for prefix, split in (("eval", "validation"), ("test", "test")):
            f1 = metrics[f"{prefix}_{task}_f1"]
            assert f"{f1:.4f}" in card.text  # the table
            assert results[(task, split, "f1")] == pytest.approx(f1, abs=1e-6)  # model-index
    assert "learning_rate" in card.text and f'load_meta_init("{repo_id}")' in card.text
    assert "trust_remote_code=True" in card.text
    assert pushed["gradient_repo"] in card.data.datasets and pushed["gradient_repo"] in card.text
    files = loopback_hub.files(repo_id)
    assert {"model.safetensors", "modeling_sign.py", "configuration_sign.py"} <= set(files)
    assert not any(name.endswith(("pytorch_model.bin", ".pt")) for name in files)
    assert json.loads(files["config.json"])["auto_map"]["AutoModel"] == (
        "modeling_sign.SignForMultiTaskNodeClassification"
    )
    for name, data in files.items():  # training_args.bin included: the token is only in the env
        assert DUMMY_TOKEN.encode() not in data, name


LOAD_CHECK = """
    import sys, torch
    from safetensors.torch import load_file
    repo_id, reference = sys.argv[1], load_file(sys.argv[2])
    {load}
    assert not model.training
    state = model.state_dict()
    assert sorted(state) == sorted(k[2:] for k in reference if k.startswith("w."))
    for name, value in state.items():
        assert torch.equal(value, reference["w." + name]), name
    with torch.no_grad():
        assert torch.equal(model(reference["inputs"]).logits, reference["logits"])
    print(type(model).__module__)
"""


def test_fresh_process_loads_identical_model_with_hf_tae(pushed):
    load = "from hf_tae import hub; model = hub.load_meta_init(repo_id)"
    out = _run_python(LOAD_CHECK.format(load=load), pushed["repo_id"], pushed["reference"],
                      cwd=pushed["tmp"])  # fmt: skip
    assert out.stdout.strip() == "hf_tae.models.sign.modeling_sign"


def test_fresh_process_without_hf_tae_loads_identical_model_as_remote_code(pushed):
    load = (
        "from transformers import AutoModel\n"
        "    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()\n"
        "    assert 'hf_tae' not in sys.modules, 'hf_tae was imported'"
    )
    out = _run_python(LOAD_CHECK.format(load=load), pushed["repo_id"], pushed["reference"],
                      cwd=pushed["tmp"])  # fmt: skip
    assert out.stdout.strip().startswith("transformers_modules.")
    assert DUMMY_TOKEN not in out.stdout + out.stderr


def test_pinned_revision_loads_old_weights_after_a_newer_push(graph):
    repo_id = _repo_id("pinned")
    old = _sign_model(graph.x.shape[1], graph.task_names, seed=1)
    first = old.push_to_hub(repo_id)
    new = _sign_model(graph.x.shape[1], graph.task_names, seed=2)
    new.push_to_hub(repo_id)
    for revision, expected in ((first.oid, old), (None, new)):
        loaded = load_meta_init(repo_id, revision=revision)
        for name, value in expected.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), (revision, name)


def test_missing_repo_revision_or_files_raise_clear_errors(pushed, tmp_path):
    missing = f"{DEFAULT_USER}/no-such-repo-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TaeError, match=f"{missing}.*does not exist"):
        load_meta_init(missing)
    with pytest.raises(TaeError, match="has no revision 'no-such-branch'"):
        load_meta_init(pushed["repo_id"], revision="no-such-branch")
    empty = _repo_id("empty")
    api = HfApi()
    api.create_repo(empty)
    api.upload_file(path_or_fileobj=b"# nothing here\n", path_in_repo="README.md", repo_id=empty)
    with pytest.raises(TaeError, match=f"{empty}.*neither config.json"):
        load_meta_init(empty)
    with pytest.raises(TaeError, match="is not an hf_tae artifact"):
        publish(tmp_path, _repo_id("nothing"))
    unknown = tmp_path / "unknown_type"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not_registered_anywhere"}))
    with pytest.raises(TaeError, match=r"not registered .*AutoConfig.register\(model_type"):
        load_meta_init(unknown)


def test_publish_saved_model_folder_uploads_safetensors_and_card(graph, tmp_path, loopback_hub):
    model = _sign_model(graph.x.shape[1], graph.task_names, seed=3)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "training_args.bin").write_bytes(b"pickled arguments")
    repo_id = _repo_id("published")
    urls = publish(tmp_path / "model", repo_id, revision="v1")
    assert set(urls) == {"model"} and urls["model"].oid in urls["model"]
    files = loopback_hub.files(repo_id, revision="v1")
    assert {"config.json", "model.safetensors", "modeling_sign.py", "README.md"} <= set(files)
    assert "training_args.bin" not in files  # pickles are never published
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "hf_tae" and f"`{graph.task_names[0]}`" in card.text
    loaded = load_meta_init(repo_id, revision=urls["model"].oid)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_cli_publishes_gradient_store_and_run_folder(pushed, graph, tmp_path, loopback_hub, capsys):
    from hf_tae.cli import main

    store = _tiny_store(tmp_path / "gradients", graph.task_names)
    repo_id = _repo_id("grads")
    assert main(["publish", str(tmp_path / "gradients"), repo_id, "--revision", "v1"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"gradients: {loopback_hub.endpoint}")
    assert DUMMY_TOKEN not in out.out + out.err
    assert "gradient_store.json" in loopback_hub.files(repo_id, "dataset", revision="v1")
    loaded = GradientStore.load(repo_id, revision="v1")
    assert torch.equal(loaded.tensors()["grad"], store.tensors()["grad"])
    with pytest.raises(SystemExit) as exit_info:  # bad input: the TaeError, status 2
        main(["publish", str(tmp_path / "nothing-here"), repo_id])
    assert exit_info.value.code == 2 and "is not a folder" in capsys.readouterr().err

    # a recipe run folder: three linked repos
    run = tmp_path / "run"
    pushed["trainer"].save_model(str(run / "meta_init"))
    graph.save(run / "data")
    _tiny_store(run / "gradients", graph.task_names)
    (run / "results.json").write_text(
        json.dumps({"meta_init": {"validation": {"eval_avg_f1": 0.5}}})
    )
    run_repo = _repo_id("run")
    urls = publish(run, run_repo)
    assert set(urls) == {"model", "data", "gradients"}
    assert "graph_info.json" in loopback_hub.files(f"{run_repo}-data", repo_type="dataset")
    card = ModelCard.load(run_repo)
    assert set(card.data.datasets) == {f"{run_repo}-data", f"{run_repo}-gradients"}
    assert "0.5000" in card.text  # results.json metrics


def test_cli_help_lists_publish(tmp_path):
    def run_cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hf_tae.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=True)

    out = run_cli("--help")
    assert "publish" in out.stdout
    out = run_cli("publish", "--help")
    assert "--revision" in out.stdout and "--private" in out.stdout and "artifact_dir" in out.stdout


def test_peft_lora_adapter_round_trip_keeps_lora_trainable():
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base_repo, adapter_repo = _repo_id("gpt2-base"), _repo_id("gpt2-lora")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    GPT2LMHeadModel(config).push_to_hub(base_repo)
    lora = LoraConfig(
        r=2,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )  # fmt: skip  (non-zero B: a meaningful comparison)
    original = get_peft_model(GPT2LMHeadModel.from_pretrained(base_repo), lora).eval()
    original.push_to_hub(adapter_repo)

    loaded = load_meta_init(adapter_repo)
    assert isinstance(loaded, PeftModel) and not loaded.training
    expected = {n: p for n, p in original.named_parameters() if "lora_" in n}
    got = dict(loaded.named_parameters())
    assert expected and all(torch.equal(got[n], p) for n, p in expected.items())
    assert all(p.requires_grad == ("lora_" in n) for n, p in got.items())
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, original(input_ids=ids).logits)


def test_pickled_training_arguments_never_hold_the_hub_token(tmp_path):
    import torch

    from hf_tae import MultitaskTrainingArguments

    args = MultitaskTrainingArguments(
        output_dir=str(tmp_path), hub_token="hf_secret_value_123", use_cpu=True
    )
    torch.save(args, tmp_path / "training_args.bin")
    assert b"hf_secret_value_123" not in (tmp_path / "training_args.bin").read_bytes()
    assert args.hub_token == "hf_secret_value_123"  # the live object keeps it for pushing


def test_image_run_folder_publishes_domains_model_and_card(tmp_path, loopback_hub):
    """A run of the image family publishes its domains (loadable by repo id, same images and
    fingerprint) and a vision meta-initialization whose card carries the image pipeline tag."""
    from transformers import ResNetConfig

    from hf_tae import ImageDomains, VisionForMultiTaskImageClassification, VisionMultiTaskConfig

    domains = ImageDomains.from_dataset(_image_dataset(), validation_fraction=0.2,
                                        test_fraction=0.2, seed=0)  # fmt: skip
    run = tmp_path / "run"
    domains.save(run / "data")
    config = VisionMultiTaskConfig(
        backbone_config=ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4], depths=[1]),
        task_names=domains.task_names, num_labels=len(domains.class_names))  # fmt: skip
    VisionForMultiTaskImageClassification(config).save_pretrained(run / "meta_init")
    repo_id = _repo_id("image-run")
    urls = publish(run, repo_id)
    assert set(urls) == {"model", "data"}
    card = ModelCard(loopback_hub.files(repo_id)["README.md"].decode())
    assert card.data.pipeline_tag == "image-classification"
    assert f"{repo_id}-data" in card.data.datasets
    loaded = ImageDomains.load(f"{repo_id}-data")
    assert loaded.task_names == domains.task_names and loaded.class_names == domains.class_names
    assert loaded.fingerprint() == domains.fingerprint()
    with pytest.raises(TaeError, match="neither an existing folder nor a Hub repo id"):
        ImageDomains.load(tmp_path / "missing")
    from hf_tae.hub import load_task_data

    assert load_task_data(run / "data").fingerprint() == domains.fingerprint()
    with pytest.raises(TaeError, match="holds no saved task data"):
        load_task_data(run / "meta_init")


def _image_dataset():
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    rows = {"image": [], "label": [], "domain": []}
    for domain in ("a", "b"):
        for k in range(20):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            rows["image"].append(PILImage.fromarray(pixels))
            rows["label"].append(k % 2)
            rows["domain"].append(domain)
    features = Features({"image": Image(), "label": ClassLabel(names=["even", "odd"]),
                         "domain": Value("string")})  # fmt: skip
    return Dataset.from_dict(rows, features=features)


def test_text_tasks_publish_with_their_tokenizer_and_load_by_repo_id(tmp_path, loopback_hub):
    """A text run's ``data/`` (rows, planted groups and the in-process tokenizer) goes to a
    dataset repo with ``publish``, and ``--text_tasks <repo id>`` rebuilds the same token ids
    from it; plain ``TextTasks`` round-trip through the Hub too."""
    from hf_tae.families import get_family
    from hf_tae.families.text import TextTasks

    family = get_family("instructions")
    args = family.arguments_class(skills=["max", "even"], train_per_template=5, eval_per_template=2)
    tasks = family.load_tasks(args)
    family.save_data(tasks, tmp_path / "data")
    repo_id = _repo_id("text-data")
    urls = publish(tmp_path / "data", repo_id)
    assert urls["data"].startswith(loopback_hub.endpoint)
    files = loopback_hub.files(repo_id, "dataset")
    assert {"text_tasks.json", "tokenizer/tokenizer.json"} <= set(files)
    again = family.load_tasks(family.arguments_class(text_tasks=repo_id))
    for column in ("input_ids", "labels", "task", "split"):
        assert list(again.dataset[column]) == list(tasks.dataset[column]), column
    assert again.source.tokenizer.get_vocab() == tasks.source.tokenizer.get_vocab()
    assert family.planted_groups(again).tolist() == [0, 0, 0, 1, 1, 1]

    plain = tasks.source.text_tasks
    plain_repo = _repo_id("text-rows")
    plain.push_to_hub(plain_repo, revision="v1")
    assert "tokenizer/tokenizer.json" not in loopback_hub.files(plain_repo, "dataset", revision="v1")
    loaded = TextTasks.load(plain_repo, revision="v1")
    assert loaded.fingerprint() == plain.fingerprint()
    with pytest.raises(TaeError, match="is not a saved TextTasks folder"):
        TextTasks.load(tmp_path)
