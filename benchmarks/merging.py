"""Merging benchmark: merged-model quality per method, and merge cost against the I/O floor.

What it measures (CPU, 1 thread; issue 14, merging_methods.md B/D)
    Quality: six generated digit-sequence tasks (reverse, sort, +1, +3, ×2 and a running sum,
    all mod 10; a task token selects the task). A GPT-2 from config (``--n_layer`` 2,
    ``--n_embd`` 64) is pre-trained to *copy* the digits whatever the task token
    (``--base_steps``): the shared initialization θ0 knows the format, not the tasks. Each task
    is then fine-tuned from θ0 (``--task_steps``), and a multitask model is fine-tuned from θ0 on
    the mixture for as many steps in total. Statistics (input Grams, K-FAC factors, empirical
    diagonal Fisher) come from each task's validation split (``--stat_examples``, as MaTS).
    Every method's hyperparameters (λ, α, CG iterations) are chosen on the validation splits;
    the table reports teacher-forced target-token accuracy on the test splits, per task and
    averaged, next to θ0, the individual models and the multitask model (MaTS's table shape).

    Cost: four fine-tuned copies of a larger GPT-2 (``--cost_layers`` 8, ``--cost_embd`` 256,
    ``--cost_vocab`` 4096, random weights; no tensor above 1/7 of the model) saved as
    safetensors, with K-FAC + Fisher statistics from a few random examples. Each merge runs
    streaming (safetensors in, shards out) in its own subprocess; reported: wall time, peak
    RSS increase (``VmHWM`` after a reset, minus RSS before: it includes touched pages of the
    memory-mapped inputs) and peak anonymous memory increase (``RssAnon`` polled every 2 ms:
    the merge's own working set), against the bytes read. Baselines on the same files: peft's
    ``merge_utils`` with every model loaded in memory, and mergekit's ``mergekit-yaml`` (if
    installed; its time includes its start-up); their outputs are compared with ours.

How to run
    OMP_NUM_THREADS=1 python benchmarks/merging.py   (about 6 minutes on a shared 2-core machine)
    writes benchmarks/results/merging.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_tae.merging import compute_statistics, merge
from hf_tae.utils.progress import disable_progress_bars

TASKS = ["reverse", "sort", "plus1", "plus3", "double", "cumsum"]
DIGITS, LENGTH = 10, 6
SEP, PAD = DIGITS + len(TASKS), DIGITS + len(TASKS) + 1


def target(task: str, x: torch.Tensor) -> torch.Tensor:
    if task == "copy":
        return x
    if task == "reverse":
        return x.flip(-1)
    if task == "sort":
        return x.sort(-1).values
    if task == "plus1":
        return (x + 1) % DIGITS
    if task == "plus3":
        return (x + 3) % DIGITS
    if task == "double":
        return (2 * x) % DIGITS
    return x.cumsum(-1) % DIGITS


def task_batch(task: int, n: int, gen: torch.Generator, name: str | None = None) -> dict:
    """``[task token, x_1..x_6, SEP, y_1..y_6]``; only the ``y`` tokens are labels. ``name``
    overrides the task's transform (θ0 is pre-trained to copy, whatever the task token)."""
    x = torch.randint(0, DIGITS, (n, LENGTH), generator=gen)
    ids = torch.cat([torch.full((n, 1), DIGITS + task), x, torch.full((n, 1), SEP),
                     target(name or TASKS[task], x)], dim=1)  # fmt: skip
    labels = ids.clone()
    labels[:, : LENGTH + 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def mixed_batch(n: int, gen: torch.Generator, tasks: list[int], name: str | None = None) -> dict:
    parts = [task_batch(t, n // len(tasks), gen, name) for t in tasks]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def train(model, batches, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss = model(**batches(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, data: dict[str, torch.Tensor]) -> float:
    logits = model(input_ids=data["input_ids"]).logits[:, :-1]
    labels = data["labels"][:, 1:]
    mask = labels != -100
    return (logits.argmax(-1)[mask] == labels[mask]).float().mean().item()


def load(config: GPT2Config, state: dict[str, torch.Tensor]) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel(config)
    model.load_state_dict(state, strict=False)  # the tied lm_head is absent from merges
    model.tie_weights()
    return model.eval()


def quality(args, out: list[str]) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, vocab_size=PAD + 1,
                        n_positions=2 * LENGTH + 2, bos_token_id=PAD, eos_token_id=PAD,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    every = list(range(len(TASKS)))
    base = GPT2LMHeadModel(config)
    t0 = time.perf_counter()
    train(base, lambda s: mixed_batch(60, gen, every, "copy"), args.base_steps, 3e-3)
    splits = {name: [task_batch(t, args.eval_examples, gen) for t in every]
              for name in ("validation", "test")}  # fmt: skip
    models = []
    for t in every:
        model = load(config, base.state_dict())
        train(model, lambda s, t=t: task_batch(t, 32, gen), args.task_steps, args.task_lr)
        models.append(model)
    multi = load(config, base.state_dict())
    train(multi, lambda s: mixed_batch(36, gen, every), args.task_steps * len(TASKS), args.task_lr)
    train_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = [
        compute_statistics(m, [v], ["gram", "kfac", "fisher"], max_examples=args.stat_examples)
        for m, v in zip(models, splits["validation"], strict=True)
    ]
    stat_time = time.perf_counter() - t0

    def scores(model, split: str) -> list[float]:
        return [accuracy(model, d) for d in splits[split]]

    rows = [("θ0 (meta-init)", "", scores(base, "test"), 0.0)]
    rows.append(("individual models", "", [accuracy(m, d) for m, d in
                                           zip(models, splits["test"], strict=True)], 0.0))  # fmt: skip
    rows.append(("multitask model", "", scores(multi, "test"), 0.0))
    grids = {
        "average": [{}],
        "task_arithmetic": [{"lam": lam} for lam in (0.2, 0.3, 0.4, 0.6, 0.8, 1.0)],
        "ties": [{"density": 0.2, "lam": lam} for lam in (0.6, 0.8, 1.0, 1.2, 1.5)],
        "ties (global trim)": [
            {"density": 0.2, "lam": lam, "trim": "global"} for lam in (0.6, 0.8, 1.0, 1.2, 1.5)
        ],  # fmt: skip
        "dare_ties": [{"density": 0.5, "lam": lam} for lam in (0.6, 0.8, 1.0, 1.2)],
        "fisher": [{}],
        "regmean": [{"alpha": a} for a in (0.5, 0.9, 1.0)],
        "mats (regmean, init TA)": [
            {"objective": "regmean", "init_lambda": lam, "max_iter": it}
            for lam in (0.3, 0.6)
            for it in (10, 100)
        ],  # fmt: skip
        "mats (kfac, init TA)": [
            {"objective": "kfac", "init_lambda": lam, "max_iter": it}
            for lam in (0.3, 0.6)
            for it in (10, 100)
        ],  # fmt: skip
        "mats (fisher, init TA)": [
            {"objective": "fisher", "init_lambda": lam, "max_iter": it}
            for lam in (0.3, 0.6)
            for it in (10, 100)
        ],  # fmt: skip
    }
    for label, grid in grids.items():
        method = label.split(" ")[0]
        best = None
        for params in grid:
            start = time.perf_counter()
            result = merge(base, models, method, statistics=stats, **params)
            seconds = time.perf_counter() - start
            merged = load(config, result.state_dict)
            val = sum(scores(merged, "validation")) / len(TASKS)
            if best is None or val > best[0]:
                best = (val, params, merged, seconds)
        _, params, merged, seconds = best
        shown = ", ".join(f"{k}={v}" for k, v in params.items() if k != "trim")
        rows.append((label, shown, scores(merged, "test"), seconds))

    out.append(f"## Quality: GPT-2 from config ({args.n_layer} layers, d={args.n_embd}), "
               f"{len(TASKS)} generated tasks, seed {args.seed}")  # fmt: skip
    out.append(f"θ0: {args.base_steps} copy steps; per task {args.task_steps} steps at lr "
               f"{args.task_lr}; "
               f"multitask {args.task_steps * len(TASKS)} steps; statistics on "
               f"{args.stat_examples} validation examples per task; test {args.eval_examples} "
               "examples per task; target-token accuracy (teacher forced).")  # fmt: skip
    out.append(f"training {train_time:.0f} s, statistics {stat_time:.1f} s (all six tasks)\n")
    header = f"| method | chosen on validation | {' | '.join(TASKS)} | average | merge s |"
    out += [header, "|" + "---|" * (len(TASKS) + 4)]
    for label, shown, accs, seconds in rows:
        cells = " | ".join(f"{a:.3f}" for a in accs)
        sec = f"{seconds:.2f}" if seconds else ""
        out.append(f"| {label} | {shown} | {cells} | **{sum(accs) / len(accs):.3f}** | {sec} |")
    out.append("")


# ------------------------------------------------------------------------------------ cost
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(fn) -> tuple[float, float, float]:
    """Seconds, peak RSS increase and peak anonymous-memory increase (MB) of ``fn()``."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss0, anon0 = _status_mb("VmRSS"), _status_mb("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")
    peak, done = [anon0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_mb("RssAnon"))
            time.sleep(0.002)

    thread = threading.Thread(target=poll)
    thread.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return seconds, _status_mb("VmHWM") - rss0, peak[0] - anon0


SHARD = 16_000_000  # output shard size of the streamed merges (the writer buffers one shard)


def cost_one(root: Path, method: str, params: dict) -> dict:
    """One merge in this process (run as a subprocess per method)."""
    models = [root / f"m{i}" for i in range(4)]
    stats = [root / f"m{i}.stats.safetensors" for i in range(4)]
    out = root / f"out-{method}-{abs(hash(json.dumps(params))) % 10**6}"
    if method.startswith("peft_"):
        return dict(zip(("seconds", "rss_mb", "anon_mb"),
                        measure(lambda: peft_merge(root, method[5:], params, out)), strict=True))  # fmt: skip
    needs = method in ("fisher", "regmean", "mats")
    seconds, rss, anon = measure(lambda: merge(root / "base", models, method,
                                               statistics=stats if needs else None,
                                               output_dir=out, max_shard_bytes=SHARD,
                                               **params))  # fmt: skip
    return {"seconds": seconds, "rss_mb": rss, "anon_mb": anon}


def peft_merge(root: Path, kind: str, params: dict, out: Path) -> None:
    """peft's merge_utils on every model loaded in memory (its usual use), written as one file."""
    from peft.utils import merge_utils
    from safetensors.torch import load_file, save_file

    base = load_file(root / "base" / "model.safetensors")
    models = [load_file(root / f"m{i}" / "model.safetensors") for i in range(4)]
    weights = torch.ones(4)
    merged = {}
    for name, b in base.items():
        taus = [m[name] - b for m in models]
        if kind == "ties":
            delta = merge_utils.ties(taus, weights, params["density"])
        else:
            delta = merge_utils.task_arithmetic(taus, weights) * params.get("lam", 1.0)
        merged[name] = b + delta
    out.mkdir()
    save_file(merged, out / "model.safetensors")


def build_cost_models(args, root: Path) -> int:
    """Base + 4 fine-tuned copies (random task vectors) and their statistics; bytes to read."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.cost_layers, n_embd=args.cost_embd, n_head=8,
                        vocab_size=args.cost_vocab, n_positions=64)  # fmt: skip
    base = GPT2LMHeadModel(config)
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, args.cost_vocab, (4, 32), generator=gen)}
    batch["labels"] = batch["input_ids"]
    for i in range(4):
        model = GPT2LMHeadModel(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.002 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"m{i}")
        compute_statistics(model, [batch], ["kfac", "fisher"], max_outgrad_dim=4096).save(
            root / f"m{i}.stats.safetensors"
        )
    return sum(f.stat().st_size for f in root.rglob("*.safetensors"))


def mergekit_run(root: Path, method: str, params: dict) -> tuple[float, Path] | None:
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    if not Path(exe).exists():
        return None
    import yaml

    config = {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32",
              "models": [{"model": str(root / f"m{i}"), "parameters": {"weight": 1.0, **params}}
                         for i in range(4)]}  # fmt: skip
    if method == "ties":
        config["parameters"] = {"normalize": True}
    (root / f"mk-{method}.yaml").write_text(yaml.safe_dump(config))
    out = root / f"mk-out-{method}"
    start = time.perf_counter()
    subprocess.run([exe, str(root / f"mk-{method}.yaml"), str(out)], check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - start, out


def cost(args, out: list[str]) -> None:
    from hf_tae.merging.sources import SafetensorsSource

    root = Path(tempfile.mkdtemp(prefix="merge-cost-"))
    try:
        total = build_cost_models(args, root)
        model_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        cases = [
            ("average", {}),
            ("task_arithmetic", {"lam": 1.0}),
            ("ties", {"density": 0.2}),
            ("ties", {"density": 0.2, "trim": "global"}),
            ("fisher", {}),
            ("regmean", {"alpha": 0.9}),
            ("mats", {"objective": "regmean", "max_iter": 10}),
            ("mats", {"objective": "kfac", "max_iter": 5}),
            ("peft_task_arithmetic", {"lam": 1.0}),
            ("peft_ties", {"density": 0.2}),
        ]
        out.append(f"## Cost: GPT-2 {args.cost_layers} layers, d={args.cost_embd}, vocab "
                   f"{args.cost_vocab}: "
                   f"{model_bytes / 1e6:.1f} MB per model (fp32), 4 models + base; statistics "
                   f"(Grams, K-FAC G, diagonal Fisher) {(total - 5 * model_bytes) / 4e6:.1f} MB "
                   "per model")  # fmt: skip
        out.append("Streaming merges read every input once (TIES global: 4 more passes over "
                   "the models) and write 16 MB shards; 'MB read' counts base + models (+ "
                   "statistics where used). One subprocess per row, 1 thread; solves in "
                   "float64 (the default).\n")  # fmt: skip
        out += ["| method | MB read | seconds | MB/s | peak RSS +MB | peak anon +MB |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        stat_bytes = total - 5 * model_bytes
        for method, params in cases:
            cmd = [sys.executable, __file__, "--cost_one", str(root), method, json.dumps(params)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)  # fmt: skip
            read = 5 * model_bytes + (stat_bytes if method in ("fisher", "regmean", "mats") else 0)
            label = method + (
                " " + ", ".join(f"{k}={v}" for k, v in params.items()) if params else ""
            )
            label += " (in memory)" if method.startswith("peft_") else ""
            out.append(f"| {label} | {read / 1e6:.0f} | {res['seconds']:.2f} | "
                       f"{read / 1e6 / res['seconds']:.0f} | {res['rss_mb']:.0f} | "
                       f"{res['anon_mb']:.0f} |")  # fmt: skip
        # agreement with peft and mergekit on the same files
        ours = {}
        for method, params in (("task_arithmetic", {"lam": 1.0}), ("ties", {"density": 0.2})):
            ours[method] = merge(root / "base", [root / f"m{i}" for i in range(4)], method,
                                 **params).state_dict  # fmt: skip
        out.append("")
        for method in ("task_arithmetic", "ties"):
            peft_out = next(root.glob(f"out-peft_{method}-*"))
            ref = SafetensorsSource(peft_out, "peft")
            diff = max((ref.get(n) - t).abs().max().item() for n, t in ours[method].items())
            differ = sum(int(((ref.get(n) - t).abs() > 1e-6).sum())
                         for n, t in ours[method].items())  # fmt: skip
            total_n = sum(t.numel() for t in ours[method].values())
            why = (" (entries at the trimming threshold, whose order flips when τ is rounded "
                   "to float32 as peft computes it)") if differ else ""  # fmt: skip
            out.append(f"max |ours − peft merge_utils| ({method}): {diff:.2e}; entries off by "
                       f"more than 1e-6: {differ} of {total_n}{why}")  # fmt: skip
            run = mergekit_run(root, method, {"density": 0.2} if method == "ties" else {})
            if run is not None:
                seconds, mk = run
                mk_src = SafetensorsSource(mk, "mergekit")
                names = [n for n in ours[method] if n in set(mk_src.names())]
                diff = max((mk_src.get(n) - ours[method][n]).abs().max().item() for n in names)
                out.append(f"mergekit-yaml {method}: {seconds:.1f} s wall (incl. start-up); "
                           f"max |ours − mergekit| {diff:.2e} over {len(names)} tensors")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--base_steps", type=int, default=150)
    parser.add_argument("--task_steps", type=int, default=150)
    parser.add_argument("--task_lr", type=float, default=1e-3)
    parser.add_argument("--eval_examples", type=int, default=256)
    parser.add_argument("--stat_examples", type=int, default=128)
    parser.add_argument("--cost_layers", type=int, default=8)
    parser.add_argument("--cost_embd", type=int, default=256)
    parser.add_argument("--cost_vocab", type=int, default=4096)
    parser.add_argument("--skip_quality", action="store_true")
    parser.add_argument("--skip_cost", action="store_true")
    parser.add_argument("--cost_one", nargs=3, metavar=("ROOT", "METHOD", "PARAMS"))
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "merging.txt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    disable_progress_bars()
    if args.cost_one:
        root, method, params = args.cost_one
        print(json.dumps(cost_one(Path(root), method, json.loads(params))))
        return
    out = ["# hf_tae merging benchmark (benchmarks/merging.py)", ""]
    start = time.perf_counter()
    if not args.skip_quality:
        quality(args, out)
    if not args.skip_cost:
        cost(args, out)
    out.append(f"\ntotal {time.perf_counter() - start:.0f} s")
    text = "\n".join(out) + "\n"
    print(text)
    Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
