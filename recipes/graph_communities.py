"""Graph community detection with hf_tae: train the meta-initialization θ0 on all tasks.

``--meta_init REPO_OR_PATH`` starts from someone else's meta-initialization (no training);
``--push_to_hub --hub_model_id you/name`` publishes the trained one with its model card.

Runs on the embedded default (a planted-community graph, generated in seconds), on SNAP
files (``--snap_dir DIR --snap_name youtube``) or on a saved graph (``--dataset PATH_OR_REPO``):

    python recipes/graph_communities.py --output_dir runs/graph_communities
    accelerate launch recipes/graph_communities.py --output_dir runs/graph_communities

Writes ``<output_dir>/meta_init`` (the model), ``<output_dir>/data`` (the graph as datasets),
``<output_dir>/gradients`` (the GradientStore of projected per-example gradients at θ0),
``<output_dir>/results.json`` (per-task validation and test metrics, baselines) and a per-task
F1 plot. Later pipeline stages (estimates, affinity, groups) extend this recipe.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser, set_seed

from hf_tae import (
    CommunityGraph,
    MultitaskTrainer,
    MultitaskTrainingArguments,
    SignConfig,
    SignForMultiTaskNodeClassification,
    generate_community_graph,
    load_meta_init,
    load_snap_communities,
)
from hf_tae.trainers.baselines import label_frequency_baseline
from hf_tae.utils.io import atomic_write_text
from hf_tae.utils.plots import plot_task_scores

logger = logging.getLogger("hf_tae.recipes.graph_communities")


@dataclass
class GraphDataArguments:
    """Where the tasks come from (first match wins: dataset, snap_dir, embedded generator)."""

    dataset: str | None = field(
        default=None, metadata={"help": "Path or Hub repo id of a saved CommunityGraph."}
    )
    snap_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with com-<name>.ungraph.txt and com-<name>.top5000.cmty.txt."},
    )
    snap_name: str = field(
        default="youtube", metadata={"help": "SNAP graph name, e.g. youtube, dblp, amazon, lj."}
    )
    num_communities: int = field(
        default=100, metadata={"help": "SNAP: the N largest communities become N tasks."}
    )
    num_groups: int = field(
        default=4, metadata={"help": "Embedded generator: number of planted task groups."}
    )
    tasks_per_group: int = field(
        default=4, metadata={"help": "Embedded generator: tasks in each group."}
    )
    data_seed_graph: int = field(
        default=0, metadata={"help": "Embedded generator / SNAP split seed."}
    )
    num_hops: int = field(default=3, metadata={"help": "SIGN hops of propagated node features."})


@dataclass
class ModelArguments:
    """The SIGN model (Grad-TAE notes A.1: hidden 256, dropout 0.5/0.3 in the paper; narrower here, see the README)."""

    meta_init: str | None = field(
        default=None,
        metadata={
            "help": "Path or Hub repo id of a meta-initialization to start from instead of training one."
        },
    )
    meta_init_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or sha) of --meta_init."}
    )

    hidden_size: int = field(
        default=8, metadata={"help": "Width of the per-hop MLPs and the head."}
    )
    num_mlp_layers: int = field(default=2, metadata={"help": "Linear layers per MLP."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout between hidden layers."})
    input_dropout: float = field(default=0.1, metadata={"help": "Dropout on input features."})


@dataclass
class GradientArguments:
    """Step 2: projected per-example gradients at the meta-initialization (Grad-TAE notes A.2)."""

    collect_gradients: bool = field(
        default=True, metadata={"help": "Collect gradients into <output_dir>/gradients."}
    )
    projection_dim: int = field(
        default=200, metadata={"help": "Dimension d of the projected gradients."}
    )
    projection_kind: str = field(
        default="factored", metadata={"help": "'factored' (per-layer hooks) or 'dense' (exact JL)."}
    )
    projection_seed: int = field(default=0, metadata={"help": "Seed of the projection matrices."})
    gradient_batch_size: int = field(default=512, metadata={"help": "Examples per gradient batch."})


RECIPE_DEFAULTS = {
    "output_dir": "runs/graph_communities",
    "learning_rate": 1e-2,
    "num_train_epochs": 60,
    "per_device_train_batch_size": 256,
    "per_device_eval_batch_size": 2048,
    "disable_tqdm": False,
}


def build_graph(data: GraphDataArguments) -> CommunityGraph:
    if data.dataset:
        return CommunityGraph.load(data.dataset)
    if data.snap_dir:
        return load_snap_communities(
            data.snap_dir, data.snap_name, data.num_communities, seed=data.data_seed_graph
        )
    return generate_community_graph(
        data.num_groups, data.tasks_per_group, seed=data.data_seed_graph
    )


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(
        (GraphDataArguments, ModelArguments, GradientArguments, MultitaskTrainingArguments)
    )
    parser.set_defaults(**RECIPE_DEFAULTS)
    data_args, model_args, grad_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    set_seed(training_args.seed)  # the model is built before the Trainer seeds anything
    graph = build_graph(data_args)
    task_set = graph.task_set(data_args.num_hops)
    logger.info("%s; %s", graph, task_set)
    config = SignConfig(
        in_features=graph.x.shape[1],
        num_hops=data_args.num_hops,
        hidden_size=model_args.hidden_size,
        num_mlp_layers=model_args.num_mlp_layers,
        task_names=graph.task_names,
        dropout=model_args.dropout,
        input_dropout=model_args.input_dropout,
    )
    if model_args.meta_init:
        model = load_meta_init(model_args.meta_init, revision=model_args.meta_init_revision)
        logger.info("starting from the meta-initialization %s", model_args.meta_init)
    else:
        model = SignForMultiTaskNodeClassification(config)
    output_dir = Path(training_args.output_dir)
    checkpoints = output_dir / "checkpoints"
    training_args.output_dir = str(checkpoints)
    trainer = MultitaskTrainer(model=model, args=training_args, task_set=task_set)
    if not model_args.meta_init:
        trainer.train()

    validation = trainer.evaluate_tasks("validation")
    test = trainer.evaluate_tasks("test")
    baseline = label_frequency_baseline(task_set, "test")
    results = {
        "graph": repr(graph),
        "tasks": task_set.task_names,
        "world_size": training_args.world_size,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "validation": validation,
        "test": test,
        "label_frequency_baseline_test": baseline,
    }
    if trainer.is_world_process_zero():
        trainer.save_model(str(output_dir / "meta_init"))
        graph.save(output_dir / "data", overwrite=True)
        atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2, default=float))
        per_task = {t: test[f"test_{t}_f1"] for t in task_set.task_names}
        plot_task_scores(
            {
                "meta-initialization": per_task,
                "label-frequency baseline": {t: baseline[t] for t in per_task},
            },
            output_dir / "test_f1_per_task.png",
            ylabel="test F1",
        )
        print(
            f"\nmeta-initialization: test avg F1 {test['test_avg_f1']:.3f} "
            f"(label-frequency baseline {np.mean(list(baseline.values())):.3f}) over {task_set.num_tasks} tasks; "
            f"world size {training_args.world_size}; saved to {output_dir}"
        )
    if grad_args.collect_gradients:
        store = trainer.collect_gradients(
            output_dir / "gradients",
            dim=grad_args.projection_dim,
            kind=grad_args.projection_kind,
            seed=grad_args.projection_seed,
            batch_size=grad_args.gradient_batch_size,
            overwrite=True,
        )
        results["gradients"] = {
            "path": str(output_dir / "gradients"),
            "rows": len(store),
            "dim": store.dim,
        }
        if trainer.is_world_process_zero():
            atomic_write_text(
                output_dir / "results.json", json.dumps(results, indent=2, default=float)
            )
            print(
                f"gradient store: {len(store)} examples × {store.dim} dims in {output_dir / 'gradients'}"
            )
    trainer.accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
