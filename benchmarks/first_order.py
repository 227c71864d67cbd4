"""The A.7 check on the embedded default: is the linearization Grad-TAE relies on accurate?

For a few sampled task subsets, θ0 (a recipe run's meta-initialization) is fine-tuned for real
on the subset with :class:`~hf_tae.MultitaskTrainer`; ``Δ = θ_ft − θ0`` is rescaled to several
norms and :func:`~hf_tae.first_order_check` reports, on the subset's validation examples, the
mean squared relative error of ``s(θ0) + ∇s(θ0)·Δ`` against ``s(θ0 + Δ)`` (first order) and
of ``s(θ0)`` alone (zeroth order, the baseline), gradtae_methods.md A.7. The ratio of the two
says how much of the change the gradient term explains.

    python recipes/graph_communities.py --output_dir runs/graph_communities --estimate false
    python benchmarks/first_order.py --run_dir runs/graph_communities
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from hf_tae import (
    CommunityGraph,
    MultitaskTrainer,
    MultitaskTrainingArguments,
    first_order_check,
    load_meta_init,
    sample_subsets,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", default="runs/graph_communities", help="A recipe run.")
    parser.add_argument("--num_subsets", type=int, default=4, help="Subsets fine-tuned from θ0.")
    parser.add_argument("--subset_size", type=int, default=4, help="Tasks per subset.")
    parser.add_argument("--epochs", type=float, default=10, help="Fine-tuning epochs.")
    parser.add_argument(
        "--norms", type=float, nargs="+", default=[10, 5, 2, 1, 0.5, 0.2, 0.1],
        help="‖Δ‖ values (A.7 graph: 10 … 1).",
    )  # fmt: skip
    parser.add_argument("--exclude", default="head.3", help="Parameters left out of Δ (A.7: head).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    graph = CommunityGraph.load(run / "data")
    meta = load_meta_init(run / "meta_init").eval()
    task_set = graph.task_set(meta.config.num_hops)
    subsets = sample_subsets(graph.num_tasks, args.num_subsets, args.subset_size, seed=0)
    tables = []
    for subset in subsets:
        tuned = copy.deepcopy(meta).train()
        training = MultitaskTrainingArguments(
            output_dir=str(run / "first_order_tmp"), learning_rate=1e-2,
            num_train_epochs=args.epochs, lr_scheduler_type="constant",
            per_device_train_batch_size=256, use_cpu=True, disable_tqdm=True, report_to="none",
            eval_strategy="no", save_strategy="no", load_best_model_at_end=False, logging_strategy="no",
        )  # fmt: skip
        MultitaskTrainer(model=tuned, args=training, task_set=task_set.select(list(subset))).train()
        delta = sum(
            (p.detach() - q.detach()).pow(2).sum()
            for (name, p), q in zip(tuned.named_parameters(), meta.parameters(), strict=True)
            if args.exclude not in name
        ).sqrt()
        table = first_order_check(
            meta, tuned, task_set.select(list(subset)), norms=args.norms, exclude=args.exclude
        )
        names = [graph.task_names[t] for t in subset]
        print(f"subset {names}: ‖θ_ft − θ0‖ = {float(delta):.2f} (without {args.exclude})")
        tables.append(table)
    mean = sum(t[["first_order_error", "zeroth_order_error"]] for t in tables) / len(tables)
    mean.insert(0, "norm", tables[0]["norm"])
    mean["ratio"] = mean["first_order_error"] / mean["zeroth_order_error"]
    print("\nmean over subsets (A.7 error: mean squared relative error of the scores)")
    with np.printoptions(precision=4):
        print(mean.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
