"""Which partition each ``--partition_choice`` rule picks on finished runs, against planted groups.

For every run folder it reloads the saved affinity, the gradient stores of all
meta-initializations and the λ the run used, and runs stage 5 (``choose_groups``, no training)
once per rule: ``silhouette`` (the default: the SDP grouping with the best mean silhouette on
the affinity, its groups that are not cohesive on the meta-initializations split into single
tasks, scored by predicted payoff against all tasks and single tasks), ``silhouette-nosplit``
(the same without the split, ``--split_incoherent_groups false``), ``payoff`` (the SDP
grouping of every k scored that way) and ``density`` (the k whose SDP objective gains most
over a shuffled null). Per run and rule it prints the groups it would train (k) and their
adjusted Rand index against the planted partition, so a rule can be checked on data it was
not chosen on (``benchmarks/scenarios.py --data_seed 1`` builds fresh instances of the suite's
processes).

    python benchmarks/scenarios.py --output_dir /tmp/heldout --data_seed 1 --ground_truth 0 \\
        --extra --train_groups false
    python benchmarks/k_choice.py /tmp/heldout/*/run --results_name k_choice_heldout

Runs without planted groups print k only; ``--not_planted NAME ...`` treats the named runs so
even when their data record groups that are not a right answer (the suite's ``interfere``
stores its conflicting pairs). A run of the text families takes its planted partition from the
task names' prefix (``max_0`` … ``even_2``: the underlying skill).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

#: rule name → the GroupingArguments it sets
RULES = {
    "silhouette": {"partition_choice": "silhouette"},
    "silhouette-nosplit": {"partition_choice": "silhouette", "split_incoherent_groups": False},
    "payoff": {"partition_choice": "payoff"},
    "density": {"partition_choice": "density"},
}
REPO = Path(__file__).resolve().parents[1]


def planted_partition(run: Path, names: list[str]):
    """The run's planted groups (graph and image data record them), else the text families'
    skill prefix, else None."""
    import numpy as np

    from hf_tae.hub import load_task_data

    try:
        groups = load_task_data(run / "data").task_groups
    except Exception:  # text runs store rows, not a planted partition
        groups = None
    if groups is not None:
        groups = np.asarray(groups)
        return None if (groups < 0).any() else groups
    skills = [name.rsplit("_", 1)[0] for name in names]
    if len(set(skills)) in (1, len(names)):
        return None
    return np.asarray([sorted(set(skills)).index(s) for s in skills])


def load_run(run: Path) -> dict:
    """What stage 5 needs from a finished run, read once: its results, saved affinity,
    every meta-initialization's gradient store and the estimation arguments it used."""
    from estimate_vs_truths import member_stores  # this folder (the script's) is on sys.path

    from hf_tae import AffinityMatrix
    from hf_tae.pipeline.arguments import EstimationArguments

    results = json.loads((run / "results.json").read_text())
    return {
        "results": results,
        "affinity": AffinityMatrix.load(run / "affinity"),
        "stores": member_stores(run, overlap=True),
        # the payoffs: the stores the run estimated its subsets on (early θ0s, if any)
        "subset_stores": member_stores(run),
        "est": EstimationArguments(
            estimator_l2=str(results["estimation"]["estimator_l2"]),
            affinity_metric=results["metrics"]["affinity"],
        ),
    }


def choose(loaded: dict, rule: str, planted) -> dict:
    """Stage 5 of a loaded run under ``rule``: the grouping it would train (with its ARI
    against ``planted`` when that is not None)."""
    from hf_tae.pipeline import stages
    from hf_tae.pipeline.arguments import GroupingArguments

    kmax = max(row["k"] for row in loaded["results"]["grouping"]["sweep"])
    grouping = GroupingArguments(max_task_groups=kmax, **RULES[rule])
    return stages.choose_groups(loaded["affinity"], grouping, planted, loaded["stores"],
                                loaded["est"], subset_stores=loaded["subset_stores"])  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    import numpy as np
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="hf-tae run folders (with results.json).")
    parser.add_argument("--results_dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--results_name", default="k_choice")
    parser.add_argument("--not_planted", nargs="*", default=[],
                        help="Run names (folder, or its parent for .../run) scored without "
                        "their recorded groups.")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    start = time.perf_counter()
    for path in args.runs:
        run = Path(path)
        name = run.parent.name if run.name == "run" else run.name
        loaded = load_run(run)
        names = loaded["results"]["tasks"]
        planted = None if name in args.not_planted else planted_partition(run, names)
        row = {"run": name, "planted k": None if planted is None else len(set(planted.tolist()))}
        for rule in RULES:
            info = choose(loaded, rule, planted)
            row[f"{rule} k"] = info["k"]
            row[f"{rule} ARI"] = info.get("adjusted_rand_vs_planted")
        rows.append(row)
        print(row, flush=True)
    head = ["run", "planted k", *[f"{r} {c}" for r in RULES for c in ("k", "ARI")]]

    def cell(value):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(h)) for h in head) + " |" for r in rows]
    ari = {r: [row[f"{r} ARI"] for row in rows if row[f"{r} ARI"] is not None] for r in RULES}
    summary = "; ".join(
        f"{r}: mean ARI {np.mean(v):.2f}, ≥ 0.9 on {sum(a >= 0.9 for a in v)}/{len(v)}"
        for r, v in ari.items()
        if v
    )
    text = (
        "\n".join(lines)
        + f"\n\nPlanted runs: {summary}.\n\nTotal: {(time.perf_counter() - start) / 60:.1f} min."
        + f"\n\nCommand: `python benchmarks/k_choice.py {shlex.join(sys.argv[1:] if argv is None else argv)}`\n"
    )
    print("\n" + text)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.results_name}.txt").write_text(text)
    return rows


if __name__ == "__main__":
    main()
