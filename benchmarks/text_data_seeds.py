"""Does the text job recover its planted skills on fresh draws of the embedded default?

What it measures
    The digit-skills default (:mod:`hf_tae.families.text.embedded`) is one draw of random digit
    strings (``--data_seed_text 0``). For each family (``instructions``: tiny T5 + LoRA;
    ``instructions_causal``: tiny GPT-2 + LoRA through TRL) and each data seed, this runs the whole
    job with its defaults (``hf-tae run FAMILY --data_seed_text S``) and prints one row: the
    chosen k, how close the runner-up k's silhouette came and on how many meta-initializations'
    own affinities the chosen k is the best, the ARI against the planted skills, real test exact
    match of the chosen groups / one model on all templates / the planted groups
    (``--group_seeds``, mean over seeds), what validation recommends, and the wall clock of the
    job's first, full run (seconds).

    A new draw changes the rows, the tokenizer trained on them and every model trained on them,
    so the rows show how much of a single run's outcome is the draw.

How to run
    python benchmarks/text_data_seeds.py --output_dir /tmp/text_seeds --data_seeds 0 1 2

    Each (family, seed) runs in ``<output_dir>/<family>/seed_<S>`` and is resumable (a rerun
    reuses finished stages). Anything after ``--extra`` goes to every job unchanged. The table and
    the exact command go to ``benchmarks/results/<results_name>.txt``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("instructions", "instructions_causal")


def run_job(family: str, seed: int, folder: Path, extra: list[str]) -> float:
    """Run (or resume) the job; the seconds of its first, full run (kept beside the run, so a
    resumed call reports them too)."""
    command = ["hf-tae", "run", family, "--output_dir", str(folder),
               "--data_seed_text", str(seed), "--disable_tqdm", "true", *extra]  # fmt: skip
    first = folder.parent / f"seed_{seed}.seconds"
    fresh = not (folder / "results.json").exists()
    start = time.perf_counter()
    with open(folder.parent / f"seed_{seed}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if fresh or not first.exists():
        first.write_text(f"{seconds:.1f}\n")
    return float(first.read_text())


def row(family: str, seed: int, folder: Path, seconds: float) -> dict:
    """One table row from a finished run's ``results.json``."""
    results = json.loads((folder / "results.json").read_text())
    grouping = results["grouping"]
    silhouettes = sorted(
        (s["silhouette"], s["k"]) for s in grouping["sweep"] if s.get("silhouette") is not None
    )
    margin = silhouettes[-1][0] - silhouettes[-2][0] if len(silhouettes) > 1 else float("nan")
    votes = grouping.get("silhouette_k_votes")
    training = results["group_training"]
    metric = training["metric"]
    summary = {name: s[metric] for name, s in training["summary"].items()}
    return {
        "family": family, "seed": seed, "k": grouping["k"],
        "runner-up k": silhouettes[-2][1] if len(silhouettes) > 1 else None,
        "silhouette margin": margin,
        "members picking k": f"{votes['best_on']}/{votes['meta_inits']}" if votes else "n/a",
        "ARI": grouping.get("adjusted_rand_vs_planted"),
        "chosen": summary.get("grouped"), "all": summary.get("all tasks"),
        "planted": summary.get("planted groups"),
        "recommended": training["recommended"]["strategy"], "seconds": seconds,
    }  # fmt: skip


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        digits = {"seconds": 0, "silhouette margin": 4}
        cells = [f"{v:.{digits.get(c, 3)}f}" if isinstance(v, float) else str(v)
                 for c, v in r.items()]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--data_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default="/tmp/text_seeds")
    parser.add_argument("--results_name", default="text_data_seeds")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="options passed to every job unchanged")  # fmt: skip
    cli = parser.parse_args()
    rows = []
    for family in cli.families:
        for seed in cli.data_seeds:
            folder = Path(cli.output_dir) / family / f"seed_{seed}"
            folder.parent.mkdir(parents=True, exist_ok=True)
            seconds = run_job(family, seed, folder, cli.extra)
            rows.append(row(family, seed, folder, seconds))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    command = "python benchmarks/text_data_seeds.py " + shlex.join(sys.argv[1:])
    out = REPO / "benchmarks" / "results" / f"{cli.results_name}.txt"
    out.write_text(f"{command}\n\n{table}\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
