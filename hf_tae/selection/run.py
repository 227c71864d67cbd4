"""The selection job: θ0 and gradients (the pipeline's stages), sources, estimates on the
target, every selection method, and optionally the real-training check; ``report.md``,
``results.json`` and PNGs in the output folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import higher_is_better
from hf_tae.utils.io import atomic_write_text

if TYPE_CHECKING:
    from hf_tae.families.base import TaskFamily
    from hf_tae.pipeline.arguments import GradientArguments, PipelineArguments
    from hf_tae.selection.arguments import SelectionArguments
    from hf_tae.trainers.arguments import MultitaskTrainingArguments

logger = logging.getLogger(__name__)

#: The methods whose choice comes from the estimates (and so from λ).
ESTIMATED_METHODS = ("ensemble (ours)", "ensemble above mean", "forward pass (GradEx code)",
                     "forward stepwise")  # fmt: skip


def build_sources(store, tasks, sel: SelectionArguments):
    """The :class:`~hf_tae.selection.sources.Sources` that ``--sources`` names; with row sources
    and ``--include_target``, the target's training rows are a source of their own (the base)."""
    from hf_tae.selection import sources as src

    if sel.sources == "tasks":
        return src.sources_from_tasks(store)
    if sel.sources == "column":
        if sel.source_column not in tasks.dataset.column_names:
            raise TaeError(f"--source_column {sel.source_column!r} is not a dataset column; "
                           f"the columns are {tasks.dataset.column_names}.")  # fmt: skip
        rows = src.sources_from_column(store, tasks.dataset[sel.source_column], sel.source_column)
    else:
        rows = src.cluster_gradients(store, sel.num_clusters, sel.sources, seed=sel.subset_seed)
    return src.with_target_rows(rows, store, sel.target) if sel.include_target else rows


def base_sources(sources, sel: SelectionArguments) -> list[str]:
    """The sources in every subset: the target's own training rows with ``--include_target``
    (the target task, or its rows' own source with row sources), else none."""
    if not sel.include_target:
        return []
    return [sel.target] if sel.sources == "tasks" else [sources.details["target_rows"]]


def select_sources(est, sel: SelectionArguments, metric: str) -> dict[str, Any]:
    """Every method's choice of sources (ids), with the ensemble table and the trajectories."""
    from hf_tae.estimation.subsets import sample_subsets
    from hf_tae.selection.select import (
        best_prefix,
        choose_top,
        ensemble_scores,
        forward_pass,
        forward_stepwise,
        gradient_similarity,
        oriented,
    )  # fmt: skip

    cand = est.candidates
    if not cand:
        raise TaeError("no candidate sources with training rows besides the base.")
    evaluated: list[tuple[int, ...]] = []

    def score(subsets):
        table = est.estimate(subsets)
        evaluated.extend(tuple(s) for s in table["subset"])
        return oriented(table[metric], metric)

    start = time.perf_counter()
    size = max(1, round(sel.subset_fraction * len(cand)))
    total = math.comb(len(cand), size)
    subsets = sample_subsets(cand, min(sel.num_subsets, total), size, seed=sel.subset_seed)
    table = est.estimate(subsets)
    evaluated.extend(tuple(s) for s in table["subset"])
    values = oriented(table[metric], metric)
    names = est.sources.names
    candidate_only = [[s for s in sub if s in cand] for sub in table["subset"]]
    ensemble = ensemble_scores(candidate_only, values, len(names), names)
    ensemble = ensemble[ensemble["source"].isin(cand)].reset_index(drop=True)
    base_score = (float(score([est.base])[0]) if est.base
                  else float(oriented([est.theta0_score()[metric]], metric)[0]))  # fmt: skip
    ranking = ensemble.sort_values("rank")["source"].tolist()
    if sel.budget is not None:
        ours = choose_top(ensemble, k=sel.budget, candidates=cand)
    else:
        ours, _ = best_prefix(score, ranking, base_score, est.base)
    above_mean = choose_top(ensemble, threshold=float(values.mean()), candidates=cand)
    passed, pass_trajectory = forward_pass(score, cand, base_score, est.base)
    stepwise, step_trajectory = forward_stepwise(score, cand, base_score, est.base)
    sims = np.mean([gradient_similarity(m.view.store.tensors("train")["grad"].numpy(),
                                        est.sources.ids, len(names),
                                        m.view.tensors("validation")["grad"].numpy())
                    for m in getattr(est, "members", [est])], axis=0)  # fmt: skip
    methods = {
        "ensemble (ours)": ours,
        "ensemble above mean": above_mean,
        "forward pass (GradEx code)": passed,
        "forward stepwise": stepwise,
    }
    seconds = time.perf_counter() - start
    ensemble["gradient_similarity"] = sims[ensemble["source"].to_numpy()]
    return {
        "methods": _with_baselines(methods, sims, cand, sel),
        "similarity": sims,
        "ensemble": ensemble,
        "ensemble_estimates": table,
        "forward_pass": pass_trajectory,
        "forward_stepwise": step_trajectory,
        "base_score": base_score,
        "subset_size": size,
        "num_evaluated": len(set(evaluated)),
        "seconds": seconds,
    }


def run_selection(
    family: str | TaskFamily,
    family_args: Any,
    pipeline_args: PipelineArguments,
    grad_args: GradientArguments,
    sel: SelectionArguments,
    training_args: MultitaskTrainingArguments,
    command: str = "",
) -> dict[str, Any]:
    """Run the selection job for ``family`` and return ``results`` (also ``results.json``).

    With ``--disable_tqdm true`` no stage shows a progress bar (tqdm, ``datasets``,
    ``huggingface_hub``, ``transformers``); the libraries' switches are restored afterwards."""
    from hf_tae.utils.progress import progress_bars_disabled

    with progress_bars_disabled(bool(training_args.disable_tqdm)):
        return _run_selection(family, family_args, pipeline_args, grad_args, sel, training_args,
                              command)  # fmt: skip


def _run_selection(family, family_args, pipeline_args, grad_args, sel, training_args,
                   command) -> dict[str, Any]:  # fmt: skip
    import torch

    from hf_tae.families import get_family
    from hf_tae.selection.estimate import SourceEstimator, SourceEstimatorEnsemble

    family = get_family(family)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False
    output_dir = Path(training_args.output_dir)
    timings: dict[str, float] = {}
    tasks = family.load_tasks(family_args)
    sel.check(tasks.task_names, family.metrics.estimated)
    metric = sel.selection_metric or family.metrics.affinity
    results: dict[str, Any] = {"family": family.name, "command": command, "target": sel.target,
                               "metric": metric, "settings": dataclasses.asdict(sel),
                               "timings": timings}  # fmt: skip

    members = _meta_inits(family, family_args, tasks, pipeline_args, grad_args, sel,
                          training_args, output_dir, timings)  # fmt: skip
    model, store, meta = members[0]["model"], members[0]["store"], members[0]["meta"]
    results["meta_init"] = {"test_target": meta["test"].get(
        f"test_{sel.target}_{family.metrics.selection}"), "reused": meta["reused"]}  # fmt: skip
    if len(members) > 1:
        results["ensemble"] = [{"seed": m["seed"], "test_target": m["meta"]["test"].get(
            f"test_{sel.target}_{family.metrics.selection}")} for m in members[1:]]  # fmt: skip
    exclude = members[0]["exclude"]

    start = time.perf_counter()
    sources = build_sources(store, tasks, sel)
    sources.save(output_dir / "sources.json")
    base = base_sources(sources, sel)
    by_l2, estimators = {}, {}
    for l2 in sel.l2_values():
        estimators[l2] = SourceEstimatorEnsemble([SourceEstimator(
            m["store"], sources, sel.target, base=base, step_norm=sel.step_norm,
            step_fraction=sel.step_fraction, theta0_norm=m["theta0_norm"], l2=l2,
            mode=sel.estimator_mode,
        ) for m in members])  # fmt: skip
        by_l2[l2] = select_sources(estimators[l2], sel, metric)
    l2s = sorted(by_l2)
    est = estimators[l2s[len(l2s) // 2]]  # the middle λ: tables, plots, the real check's estimates
    chosen = vote_across_l2(by_l2, est.candidates, sel) if len(l2s) > 1 else by_l2[l2s[0]]
    # each θ0 alone: how much the choice depends on the meta-initialization drawn
    per_member = zip(*(e.members for e in estimators.values()), strict=True)
    by_member = [_choose(e, sel, metric) for e in per_member] if len(members) > 1 else []
    rep = _representation_similarity(family, family_args, [m["model"] for m in members], tasks,
                                     est, sel)  # fmt: skip
    if rep is not None:
        from hf_tae.selection.select import top_k

        chosen["ensemble"]["representation_similarity"] = rep[chosen["ensemble"]["source"]]
        k = len(chosen["methods"]["ensemble (ours)"])
        chosen["methods"]["representation similarity"] = top_k(rep, k, est.candidates)
    timings["estimation + selection"] = time.perf_counter() - start
    names = sources.names
    results["sources"] = {"method": sources.method, "details": sources.details, "names": names,
                          "counts": sources.counts().tolist(), "base": [names[b] for b in est.base]}  # fmt: skip
    results["methods"] = {m: [names[s] for s in c] for m, c in chosen["methods"].items()}
    results["by_meta_init"] = [{"seed": m["seed"], **{k: [names[s] for s in c[k]]
                                                      for k in ESTIMATED_METHODS}}
                               for m, c in zip(members, by_member, strict=True)] if by_member else []  # fmt: skip
    results["ensemble"] = chosen["ensemble"].to_dict(orient="records")
    results["forward_pass"] = chosen["forward_pass"].to_dict(orient="records")
    results["forward_stepwise"] = chosen["forward_stepwise"].to_dict(orient="records")
    results["estimation"] = {"subsets_evaluated": chosen["num_evaluated"],
                             "seconds": chosen["seconds"], "subset_size": chosen["subset_size"],
                             "base_score": chosen["base_score"], "l2": est.estimator.l2,
                             "by_l2": {str(l2): {m: [names[s] for s in c["methods"][m]]
                                                 for m in ESTIMATED_METHODS}
                                       for l2, c in by_l2.items()}}  # fmt: skip
    ours = chosen["methods"]["ensemble (ours)"]
    w = est.fit([ours or est.base])
    results["first_order"] = _first_order(family, family_args, model, est, w, tasks, exclude, sel)
    if len(by_l2) > 1:  # how linear the model is along each λ's own choice
        results["first_order_by_l2"] = {
            str(l2): _first_order(family, family_args, model, e,
                                  e.fit([by_l2[l2]["methods"]["ensemble (ours)"] or e.base]),
                                  tasks, exclude, sel)
            for l2, e in estimators.items()
        }  # fmt: skip
    _save(results, output_dir)

    if sel.check_by_training:
        results["training"] = _check(family, family_args, tasks, est, chosen, sel, training_args,
                                     output_dir, metric, timings,
                                     [c["ensemble (ours)"] for c in by_member])  # fmt: skip
    _save(results, output_dir)
    from hf_tae.selection.report import plot_selection, write_selection_report

    plot_selection(results, output_dir)
    write_selection_report(results, output_dir)
    return results


def _meta_inits(family, family_args, tasks, pipeline_args, grad_args, sel, training_args,
                output_dir: Path, timings: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    """``--num_meta_inits`` θ0s (training seeds seed, seed+1, …) and their gradient stores, as
    the pipeline's ensemble: member 0 in ``output_dir`` (``meta_init/``, ``gradients/``), the
    others under ``ensemble/member_<i>/``. Returns per member its model, store, stage info,
    seed, ``‖θ0‖`` over the projected parameters and the excluded parameters."""
    from hf_tae.pipeline import stages

    members = []
    timings["meta-initialization"] = timings["gradients"] = 0.0
    for member in range(sel.num_meta_inits):
        run_dir, args = stages.member_run(output_dir, training_args, member)
        start = time.perf_counter()
        trainer, meta = stages.train_meta_init(family, family_args, tasks, pipeline_args, args,
                                               run_dir, save_data=member == 0)  # fmt: skip
        timings["meta-initialization"] += time.perf_counter() - start
        start = time.perf_counter()
        store, exclude = stages.collect_member_gradients(trainer, family, family_args, grad_args,
                                                         run_dir, member)  # fmt: skip
        timings["gradients"] += time.perf_counter() - start
        model = trainer.model.eval()
        projected = {n for n, _ in store.metadata.get("projector", {}).get("parameters", [])}
        norm = math.sqrt(sum(float((p.detach().double() ** 2).sum())
                             for n, p in model.named_parameters() if n in projected))  # fmt: skip
        members.append({"model": model, "store": store, "meta": meta, "seed": args.seed,
                        "theta0_norm": norm, "exclude": exclude})  # fmt: skip
    if all(m["meta"]["reused"] for m in members):  # the time of the runs that trained them
        timings["meta-initialization"] = _previous_timing(output_dir, "meta-initialization",
                                                          timings["meta-initialization"])  # fmt: skip
    return members


def _representation_similarity(family, family_args, models, tasks, est, sel):
    """Cosine of mean representations (the input of the output head), averaged over the
    meta-initializations' ``models``, or None when the model has no module named by
    ``--representation_module`` or a known head."""
    from hf_tae.selection.check import representation_similarity

    module = sel.representation_module
    if module is None:
        names = dict(models[0].named_modules())
        module = next((m for m in ("classifier", "head", "heads.0") if m in names), None)
    if module is None or module == "none":
        return None
    store = est.view.store
    target = est.view.tensors("validation")["example_id"].numpy()
    example_ids = store.tensors("train")["example_id"].numpy()
    return np.mean([representation_similarity(model, tasks, module, example_ids, est.sources.ids,
                                              len(est.sources), target,
                                              collate_fn=family.collate_fn(family_args))
                    for model in models], axis=0)  # fmt: skip


def _with_baselines(methods: dict[str, list[int]], sims: np.ndarray, cand: list[int],
                    sel: SelectionArguments) -> dict[str, list[int]]:  # fmt: skip
    """``methods`` plus the baselines: all sources, the base alone, gradient similarity sized
    like ``ensemble (ours)`` (it has no k of its own) and by its own natural rule (every source
    whose mean gradient has a positive cosine with the target's: a first-order step on it
    lowers the target's loss), and ``--random_baselines`` random subsets of our size (none
    when our size is every candidate)."""
    from hf_tae.selection.select import random_subsets, top_k

    k = max(len(methods["ensemble (ours)"]), 1)
    out = {**methods, "all sources": list(cand), "gradient similarity": top_k(sims, k, cand),
           "gradient similarity (cosine > 0)": [c for c in cand if sims[c] > 0],
           "base only": []}  # fmt: skip
    if k < len(cand):  # k of all the candidates is one subset: all sources, already there
        for i, draw in enumerate(random_subsets(cand, k, sel.random_baselines,
                                                seed=sel.subset_seed)):  # fmt: skip
            out[f"random {k} #{i}"] = draw
    return out


def _choose(members_by_l2, sel: SelectionArguments, metric: str) -> dict[str, list[int]]:
    """One θ0's own choice per estimated method: its estimator at every λ (in
    ``sel.l2_values()`` order), voted across λ as the job votes."""
    by_l2 = {l2: select_sources(e, sel, metric) for l2, e in zip(sel.l2_values(), members_by_l2,
                                                                 strict=True)}  # fmt: skip
    chosen = vote_across_l2(by_l2, members_by_l2[0].candidates, sel) if len(by_l2) > 1 else (
        next(iter(by_l2.values())))  # fmt: skip
    return {k: chosen["methods"][k] for k in ESTIMATED_METHODS}


def vote_across_l2(by_l2: dict[float, dict[str, Any]], cand: list[int],
                   sel: SelectionArguments) -> dict[str, Any]:  # fmt: skip
    """One choice per method from the choices at every λ: a source is kept when more than half
    of the λ values keep it (stability selection along the regularization path, Meinshausen and
    Bühlmann 2010). No single λ is right on every data set (README: data selection), while a source
    that only one λ adds is most often an artefact of that λ. Tables and trajectories are the
    middle λ's; the baselines are re-drawn at the voted size."""
    l2s = sorted(by_l2)
    middle = by_l2[l2s[len(l2s) // 2]]
    voted = {}
    for method in ESTIMATED_METHODS:
        counts = Counter(s for c in by_l2.values() for s in c["methods"][method])
        voted[method] = sorted(s for s, n in counts.items() if 2 * n > len(l2s))
    return {
        **middle,
        "methods": _with_baselines(voted, middle["similarity"], cand, sel),
        "num_evaluated": sum(c["num_evaluated"] for c in by_l2.values()),
        "seconds": sum(c["seconds"] for c in by_l2.values()),
    }


def _first_order(family, family_args, model, est, w, tasks, exclude, sel) -> dict[str, Any]:
    """A.7 error of the chosen subset's estimate at its step; skipped without a projector."""
    from hf_tae.selection.check import first_order_error

    if "projector" not in est.view.metadata:
        return {"skipped": "the gradient store records no projector to lift w"}
    return first_order_error(model, est, w[0], tasks, score_fn=family.score_function(family_args),
                             exclude=exclude, collate_fn=family.collate_fn(family_args),
                             max_examples=sel.first_order_examples)  # fmt: skip


def _check(family, family_args, tasks, est, chosen, sel, training_args, output_dir, metric,
           timings, member_choices=()) -> dict[str, Any]:  # fmt: skip
    """Real training of every method's choice, of each meta-initialization's own choice
    (``member_choices``) and of ``--truth_subsets`` random subsets."""
    from hf_tae.estimation.subsets import sample_subsets
    from hf_tae.selection.check import estimated_vs_real

    if not sel.include_target:
        return {"skipped": "real training needs the target's own training rows in every run "
                           "(--include_target true)"}  # fmt: skip
    names = est.sources.names
    cand = est.candidates

    def as_names(subset):  # the sources of a run by name, base included, sorted by id
        return [names[s] for s in sorted({*est.base, *subset})]

    methods = chosen["methods"]
    size = chosen["subset_size"]
    pool = sample_subsets(cand, min(sel.truth_subsets, math.comb(len(cand), size)), size,
                          seed=sel.subset_seed + 1) if sel.truth_subsets else []  # fmt: skip
    # the target with each source alone: does the source really help or hurt?
    singles = [[c] for c in cand] if sel.check_each_source else []
    every = [as_names(s) for s in [*methods.values(), *member_choices, *singles, *pool]]
    unique = list({tuple(s): s for s in every}.values())
    start = time.perf_counter()
    real, per_run = _train(family, family_args, tasks, est, unique, sel, training_args, output_dir)
    timings["real training"] = time.perf_counter() - start
    estimated = est.estimate([[names.index(t) for t in s] for s in unique])
    estimated["subset"] = [[names[t] for t in s] for s in estimated["subset"]]
    selection_metric = family.metrics.selection

    def real_value(subset, split, m):
        rows = real[(real["split"] == split) & (real["subset"].map(tuple) == tuple(subset))]
        return float(rows[m].iloc[0])

    by_method = {m: {"sources": [names[s] for s in c],
                     "test": real_value(as_names(c), "test", selection_metric),
                     "validation": real_value(as_names(c), "validation", selection_metric),
                     "test_" + metric: real_value(as_names(c), "test", metric)}
                 for m, c in methods.items()}  # fmt: skip
    by_meta_init = [{"sources": [names[s] for s in c],
                     "test": real_value(as_names(c), "test", selection_metric)}
                    for c in member_choices]  # fmt: skip
    alone = by_method["base only"]["test"]
    effects = {names[c[0]]: real_value(as_names(c), "test", selection_metric) - alone
               for c in singles}  # fmt: skip
    validation = real[real["split"] == "validation"]
    agreement = estimated_vs_real(estimated, validation, metric)
    agreement_truth = estimated_vs_real(
        estimated[[tuple(s) in {tuple(as_names(p)) for p in pool} for s in estimated["subset"]]],
        validation, metric) if len(pool) >= 3 else None  # fmt: skip
    # selection by training would train every subset the estimates evaluated
    estimation_seconds = timings["gradients"] + timings["estimation + selection"]
    return {
        "metric": selection_metric,
        "by_method": by_method,
        "by_meta_init": by_meta_init,
        "source_effects": effects,
        "estimated_vs_real": agreement,
        "estimated_vs_real_random": agreement_truth,
        "pairs": [
            {"subset": s, "estimated": float(e), "real": real_value(s, "validation", metric)}
            for s, e in zip(estimated["subset"], estimated[metric], strict=True)
        ],  # fmt: skip
        "runs": len(unique) * len(sel.train_seeds),
        "seconds_per_run": per_run,
        "compute": {
            "subsets_evaluated": chosen["num_evaluated"],
            "training_seconds_for_them": per_run * chosen["num_evaluated"],
            "estimation_seconds": estimation_seconds,
            "ratio": per_run * chosen["num_evaluated"] / max(estimation_seconds, 1e-9),
            "ratio_with_meta_init": per_run
            * chosen["num_evaluated"]
            / max(estimation_seconds + timings["meta-initialization"], 1e-9),
        },
        "higher_is_better": higher_is_better(selection_metric),
        "recommended": recommend(by_method, selection_metric),
    }


def _train(family, family_args, tasks, est, subsets, sel, training_args, output_dir):
    """Real runs of ``subsets`` (source names, base included) with the family's trainer:
    subsets of tasks with task sources, else the training rows of the sources (plus every
    held-out row). Returns the target's table and the seconds of one run."""
    from hf_tae.pipeline.stages import fresh_model, init_fingerprint, run_arguments
    from hf_tae.selection.check import train_source_subsets, train_subsets

    common = {"seeds": sel.train_seeds, "show_progress": not training_args.disable_tqdm,
              "trainer_class": family.trainer_class,
              "fingerprint": init_fingerprint(family, family_args, tasks, output_dir,
                                              sel.train_init)}  # fmt: skip
    model_init = fresh_model(family, family_args, tasks, output_dir, sel.train_init)
    args = run_arguments(training_args)
    if sel.sources == "tasks":
        return train_subsets(model_init, tasks, sel.target, subsets, args,
                             output_dir / "training", **common)  # fmt: skip
    train = est.view.store.tensors("train")
    rows = {"example_id": train["example_id"].numpy(), "task": train["task"].numpy()}
    return train_source_subsets(model_init, tasks, est.sources, rows, sel.target, subsets, args,
                                output_dir / "training" / "rows", **common)  # fmt: skip


#: The choices the recommendation weighs: the estimate's methods and the trivial answers (the
#: similarity baselines and random draws are what it is compared with, not candidates).
RECOMMENDATION_CANDIDATES = (*ESTIMATED_METHODS, "all sources", "base only")


def recommend(by_method: dict[str, dict[str, Any]], metric: str) -> dict[str, Any]:
    """The estimate proposes, validation decides (as the grouping job does): of the
    :data:`RECOMMENDATION_CANDIDATES` that were trained, the one whose real model scores best
    on the target's validation rows (``metric``; on a tie the earlier one, ours first). Its
    test score is reported next to every method's, never used to choose."""
    from hf_tae.pipeline.stages import best_strategy

    options = [m for m in RECOMMENDATION_CANDIDATES if m in by_method]
    best = best_strategy({m: by_method[m]["validation"] for m in options}, higher_is_better(metric))
    return {"method": best, "sources": by_method[best]["sources"],
            "validation": by_method[best]["validation"], "test": by_method[best]["test"],
            "candidates": options}  # fmt: skip


def _previous_timing(output_dir: Path, stage: str, default: float) -> float:
    """``stage``'s time in an earlier ``results.json`` of this folder (a reused stage), else
    ``default``."""
    path = output_dir / "results.json"
    if path.is_file():
        return float(json.loads(path.read_text()).get("timings", {}).get(stage, default))
    return default


def _save(results: dict[str, Any], output_dir: Path) -> None:
    atomic_write_text(output_dir / "results.json",
                      json.dumps(results, indent=2, default=_plain) + "\n")  # fmt: skip


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
