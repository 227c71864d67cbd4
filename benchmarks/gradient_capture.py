"""Cost of projected per-example gradients against a plain step and the TRAK/LESS ways.

What it measures (gradient_projection.md D5, on CPU)
    A random-init GPT-2 (``--n_layer`` 4, ``--n_embd`` 128, vocab 4096), a batch of
    ``--batch_size`` 8 × ``--seq_len`` 128 tokens, score = mean gold next-token log-probability
    per example, projected to ``--dim`` features. Two parameter sets: all parameters
    ("full") and peft LoRA r=8 on ``c_attn``, ``c_proj``, ``c_fc`` ("lora"). Methods, on the
    same parameters and inputs:

    * ``plain``: one batched forward + backward of ``scores.sum()`` (the denominator);
    * ``factored``: :class:`~hf_tae.gradients.ProjectedGradientCapture`, Kronecker 16×16 per
      linear, second stage to ``dim``; ``factored_stage1``: the same without second stage;
    * ``dense``: the capture's exact mode (per-module exact per-example gradients + dense
      seeded JL regenerated every batch within a ``--dense_cache_gb`` cache);
      ``dense_cached``: the same with a cache that holds the whole matrix (same memory as TRAK);
    * ``trak``: ``torch.func.vmap(grad(functional_call))`` per-example gradients (B × D
      materialized), then ``[B, D] @ P`` with a Gaussian ``P`` materialized once, outside
      the timings (blockwise regeneration per batch if ``D·dim`` exceeds ``--max_matrix_gb``);
    * ``less``: a batch-size-1 loop of forward + backward, gradients flattened, same ``P``.

    Timings: ``--warmup`` 2 rounds, then ``--repeats`` 5 rounds (``--cnn_repeats`` 20 for the
    cheaper ``cnn`` batches); in each round every method runs once (interleaved), the median
    and min per batch are reported with the ratio of the medians to ``plain``. Memory: a separate pass per method; the peak resident set size
    (``VmHWM`` reset through ``/proc/self/clear_refs``, after ``malloc_trim``) minus the
    resident size before the call. tracemalloc does not see torch's allocator, so RSS is used.

    All inputs pass ``position_ids`` of shape ``[batch, seq]``: with GPT-2's default
    ``[1, seq]`` ids the position embedding is unbatched and the capture falls back to one
    backward per example for it.

    Variant ``cnn``: a random-init ``transformers`` ResNet (``--cnn_hidden`` 32 64,
    ``--cnn_depths`` 1 1, ``--cnn_embedding`` 32, ``--cnn_layer_type`` basic: two 3 × 3
    convolutions per block; eval mode, random batch-norm statistics), ``--cnn_batch`` 64 RGB
    images of ``--cnn_image`` 32 × 32, score = gold-class log-odds
    (:class:`~hf_tae.models.scores.GoldLogOddsScore`), all parameters. Besides the methods
    above it has ``exact_convs``: the factored capture with convolutions forced onto the
    exact ``torch.func`` path (``vmap`` of ``vjp``, then Kronecker blocks), which is what
    convolutions took before they joined the factored path.

How to run
    ``OMP_NUM_THREADS=1 python benchmarks/gradient_capture.py`` (about 4 minutes on one thread);
    ``--variants lora cnn`` or ``--methods plain factored`` restrict it; ``--json out.json``
    saves the numbers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from hf_tae.gradients import ProjectedGradientCapture  # noqa: E402
from hf_tae.gradients import capture as capture_module  # noqa: E402
from hf_tae.models.scores import GoldLogOddsScore  # noqa: E402

METHODS = (
    "plain",
    "factored",
    "factored_stage1",
    "exact_convs",
    "dense",
    "dense_cached",
    "trak",
    "less",
)
VARIANTS = ("full", "lora", "cnn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=type(
            "Fmt",
            (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter),
            {},
        ),
    )
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument(
        "--attn_implementation",
        default="eager",
        help="eager gives torch.func.vmap (trak) its batching rules; sdpa falls back to a loop",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cnn_repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max_matrix_gb", type=float, default=3.0)
    parser.add_argument("--dense_cache_gb", type=float, default=0.25)
    parser.add_argument("--cnn_hidden", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--cnn_depths", type=int, nargs="+", default=[1, 1])
    parser.add_argument("--cnn_embedding", type=int, default=32)
    parser.add_argument("--cnn_layer_type", choices=["basic", "bottleneck"], default="basic")
    parser.add_argument("--cnn_image", type=int, default=32)
    parser.add_argument("--cnn_batch", type=int, default=64)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json", help="write the results to this file")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- setup
@dataclass
class Workload:
    """A model, one batch, and how to turn (a slice of) the batch into per-example scores."""

    model: torch.nn.Module
    batch: dict[str, torch.Tensor]
    model_inputs: Callable[[dict], dict]  # batch -> keyword arguments of the model
    score: Callable[[object, dict], torch.Tensor]  # (model outputs, batch) -> [B]
    description: str

    def scores(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.score(model(**self.model_inputs(batch)), batch)


def build_workload(args: argparse.Namespace, variant: str) -> Workload:
    if variant == "cnn":
        return build_cnn(args)
    model = build_model(args, variant)
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch_size, args.seq_len)
    batch = {
        "input_ids": torch.randint(0, args.vocab_size, shape, generator=gen),
        "position_ids": torch.arange(args.seq_len).expand(shape),
    }
    return Workload(
        model,
        batch,
        lambda batch: batch,
        lambda out, batch: score_logits(out.logits, batch["input_ids"]),
        f"B = {args.batch_size}, T = {args.seq_len}",
    )


def build_cnn(args: argparse.Namespace) -> Workload:
    """Random-init ResNet in eval mode with random batch-norm statistics; gold-class log-odds."""
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=args.cnn_embedding,
        hidden_sizes=args.cnn_hidden,
        depths=args.cnn_depths,
        layer_type=args.cnn_layer_type,
        num_labels=10,
    )
    model = ResNetForImageClassification(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    size = args.cnn_image
    batch = {
        "pixel_values": torch.randn(args.cnn_batch, 3, size, size, generator=gen),
        "labels": torch.randint(0, 10, (args.cnn_batch,), generator=gen),
    }
    score = GoldLogOddsScore()
    return Workload(
        model.eval(),
        batch,
        lambda batch: {"pixel_values": batch["pixel_values"]},
        score,
        f"ResNet ({args.cnn_layer_type}) hidden {args.cnn_hidden} depths {args.cnn_depths}, "
        f"B = {args.cnn_batch}, {size}x{size} RGB",
    )


def build_model(args: argparse.Namespace, variant: str) -> torch.nn.Module:
    """Random-init GPT-2 in eval mode; for ``lora`` wrapped by peft (adapters trainable)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=4,
        vocab_size=args.vocab_size,
        n_positions=args.seq_len,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=args.attn_implementation,
    )
    model = GPT2LMHeadModel(config)
    if variant == "lora":
        import peft

        lora = peft.LoraConfig(
            r=args.lora_rank,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            init_lora_weights=False,
        )
        model = peft.get_peft_model(model, lora)
    return model.eval()


def score_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean gold next-token log-probability of each example, ``[B]``."""
    logprobs = logits[:, :-1].log_softmax(-1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1).mean(1)


def reference_matrix(num_params: int, dim: int, max_bytes: float) -> torch.Tensor | None:
    """TRAK/LESS's dense Gaussian ``P`` ``[D, dim]``, or ``None`` when it exceeds ``max_bytes``."""
    if num_params * dim * 4 > max_bytes:
        return None
    gen = torch.Generator().manual_seed(0)
    return torch.randn(num_params, dim, generator=gen).div_(math.sqrt(dim))


def reference_project(flat: torch.Tensor, matrix: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``flat @ P``; without a stored ``P``, regenerate it in blocks of rows (BasicProjector)."""
    if matrix is not None:
        return flat @ matrix
    out = flat.new_zeros(flat.shape[0], dim)
    rows = max(1, (1 << 22) // dim)
    for i, start in enumerate(range(0, flat.shape[1], rows)):
        stop = min(start + rows, flat.shape[1])
        gen = torch.Generator().manual_seed(i)
        out.addmm_(flat[:, start:stop], torch.randn(stop - start, dim, generator=gen))
    return out.div_(math.sqrt(dim))


_FACTORED_LAYER = capture_module.factored_layer


def no_factored_convs(module: torch.nn.Module) -> str | None:
    """``factored_layer`` as before convolutions joined the factored path."""
    layer = _FACTORED_LAYER(module)
    return None if layer == "conv" else layer


def make_methods(
    args: argparse.Namespace, work: Workload
) -> tuple[dict[str, Callable[[], object]], int, bool]:
    """One zero-argument callable per selected method, each processing the batch once.

    Also returns the number of differentiated parameters and whether ``P`` is stored.
    """
    model, batch, scores_of = work.model, work.batch, work.scores
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in params]
    num_params = sum(p.numel() for _, p in params)
    needs_matrix = {"trak", "less"} & set(args.methods)
    max_bytes = args.max_matrix_gb * 2**30 if needs_matrix else 0
    matrix = reference_matrix(num_params, args.dim, max_bytes)

    def plain():
        model.zero_grad(set_to_none=True)
        scores_of(model, batch).sum().backward()

    def ours(dim: int | None = args.dim, exact_convs: bool = False, **options):
        layer = no_factored_convs if exact_convs else _FACTORED_LAYER
        with mock.patch.object(capture_module, "factored_layer", layer):  # read by __init__ only
            capture = ProjectedGradientCapture(model, dim=dim, **options)

        def run():
            with capture:
                return capture.per_example(scores_of(model, batch))

        return run

    def trak():
        detached = {n: p.detach() for n, p in params}

        def one(p, example):
            example = {k: v[None] for k, v in example.items()}
            out = functional_call(model, p, (), work.model_inputs(example))
            return work.score(out, example)[0]

        grads = vmap(grad(one), in_dims=(None, 0))(detached, batch)
        flat = torch.cat([grads[n].flatten(1) for n in names], 1)
        return reference_project(flat, matrix, args.dim)

    def less():
        rows = []
        for e in range(next(iter(batch.values())).shape[0]):
            model.zero_grad(set_to_none=True)
            scores_of(model, {k: v[e : e + 1] for k, v in batch.items()}).sum().backward()
            rows.append(torch.cat([p.grad.flatten() for _, p in params]))
        model.zero_grad(set_to_none=True)
        return reference_project(torch.stack(rows), matrix, args.dim)

    whole_matrix_bytes = int(num_params * args.dim * 4 * 1.05) + 2**20
    factories = {
        "plain": lambda: plain,
        "factored": lambda: ours(kind="factored"),
        "factored_stage1": lambda: ours(dim=None, kind="factored", second_stage=False),
        "exact_convs": lambda: ours(kind="factored", exact_convs=True),
        "dense": lambda: ours(kind="dense", cache_bytes=int(args.dense_cache_gb * 2**30)),
        "dense_cached": lambda: ours(kind="dense", cache_bytes=whole_matrix_bytes),
        "trak": lambda: trak,
        "less": lambda: less,
    }
    chosen = [m for m in args.methods if m != "exact_convs" or has_convs(model)]
    return {name: factories[name]() for name in chosen}, num_params, matrix is not None


def has_convs(model: torch.nn.Module) -> bool:
    return any(_FACTORED_LAYER(m) == "conv" for m in model.modules())


# --------------------------------------------------------------------------- measurement
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_extra_rss_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory during ``fn()`` above the resident memory before it (MiB)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    fn()
    return _status_mb("VmHWM") - before


def time_methods(methods: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each method, rounds interleaved across methods."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(warmup + repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    work = build_workload(args, variant)
    methods, num_params, stored = make_methods(args, work)
    repeats = args.cnn_repeats if variant == "cnn" else args.repeats
    times = time_methods(methods, args.warmup, repeats)
    memory = {name: peak_extra_rss_mb(fn) for name, fn in methods.items()}
    base = statistics.median(times["plain"]) if "plain" in times else float("nan")
    rows = {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "ratio_to_plain": statistics.median(t) / base,
            "peak_extra_rss_mb": memory[name],
        }
        for name, t in times.items()
    }
    return {
        "num_params": num_params,
        "reference_matrix_stored": stored,
        "workload": work.description,
        "methods": rows,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    results = {"settings": vars(args), "torch": torch.__version__, "variants": {}}
    for variant in args.variants:
        result = run_variant(args, variant)
        results["variants"][variant] = result
        print(
            f"\n{variant}: D = {result['num_params']:,} parameters, {result['workload']}, "
            f"dim = {args.dim}, threads = {args.threads}, "
            f"reference P stored: {result['reference_matrix_stored']}"
        )
        print(f"{'method':<16}{'median s':>10}{'min s':>10}{'ratio':>8}{'peak +MiB':>11}")
        for name, row in result["methods"].items():
            print(
                f"{name:<16}{row['median_s']:>10.3f}{row['min_s']:>10.3f}"
                f"{row['ratio_to_plain']:>8.2f}{row['peak_extra_rss_mb']:>11.0f}"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
