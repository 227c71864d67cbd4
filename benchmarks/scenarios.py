"""Scenario suite: does the job pick the right grouping on task structures it was not tuned on?

What it measures
    The embedded default data were built for the method: four equal groups of near-duplicate
    communities. This suite runs the whole job (``hf-tae run graph``: meta-initializations,
    gradients, estimated affinity, SDP groups, real training of the groups) on task structures
    made by other processes, and asks one question per scenario: does one model per chosen
    group do at least as well, in real training, as the better of the two trivial answers
    (one model on all tasks, one model per task)? Where the construction plants a partition, it
    also scores the chosen groups against it (ARI) and trains the planted groups for real.

    Scenarios (``--scenarios``; each builder's docstring says what it plants and why):

    ========== ======================================================== ============================
    name        process                                                  planted / right answer
    ========== ======================================================== ============================
    default     ``generate_community_graph()`` (the embedded default)    4 × 4 groups / the planted
    harder      ``generate_community_graph(core_keep=0.8,                4 × 4 groups / planted,
                private_size=25)``                                       close to all tasks
    unequal     nested affiliation graph in SNAP files: families of      4 families + 5 lone tasks
                6, 4, 3, 2 near-duplicate communities + 5 lone ones      (k = 9) / the planted
    interfere   disjoint communities, paired in shared neighbourhoods     none / single tasks
                with opposite feature signatures, SNAP files
    weak        Bernoulli sampling of group regions (Jaccard ≈ 0.25       4 × 4 groups / planted if
                within a group, a weaker signature), SNAP files           weak overlap still transfers
    none        independent uniform random communities (chance            none / all or single tasks
                overlap only), SNAP files
    heavy       LFR-like: power-law families (8, 5, 3, 2, 2, 1 × 4),      9 families / the planted,
                power-law sizes and degrees, hub nodes shared across      hubs blur it
                families, spectral features (the SNAP loader's)
    many        50 tasks: 10 small blocks × 5 Bernoulli communities       10 × 5 groups / the planted
    ========== ======================================================== ============================

    The SNAP-format scenarios write ``com-<name>.ungraph.txt`` and ``com-<name>.top5000.cmty.txt``
    under ``<output_dir>/<scenario>/snap/`` and read them back with hf_tae's own
    :func:`~hf_tae.load_snap_communities` (so the job sees exactly what ``--snap_dir`` would give:
    the subgraph induced by the communities, per-task splits), then attach the planted partition
    (``CommunityGraph.task_groups``) and save the graph for ``--dataset``.

    Per scenario, one row: tasks, expected answer, planted k, chosen k and how it was chosen, ARI
    against the planted partition, real test F1 (the family's selection metric, mean over tasks
    and seeds) of one model per chosen group / on all tasks / per task / per planted group, the
    best trivial answer (max of all and single), the gap chosen − best trivial with its noise,
    a verdict, the corrected Spearman of estimated against fine-tuned affinity, the estimate's
    self-agreement across meta-initializations against the truth's across seeds, and the time.

    Noise: for every strategy the per-seed average over tasks (from
    ``<run>/group_training/results.jsonl``), and its standard deviation over the seeds. The
    verdict is ``ok`` when ``chosen ≥ best trivial − noise`` with ``noise`` the larger of the
    two strategies' seed-to-seed standard deviations, ``worse`` otherwise; ``better`` when the
    chosen groups beat the best trivial answer by more than the noise.

How to run
    ``python benchmarks/scenarios.py`` (every scenario, seeds 0 1, 12 ground-truth subsets)
    prints the table and writes ``benchmarks/results/scenarios.txt`` (the table and the exact
    command) and ``scenarios.png`` (test F1 per strategy and scenario). Each scenario runs in
    ``<output_dir>/<scenario>/run`` and is resumable: a rerun with the same ``--output_dir``
    reuses the meta-initializations, the group-training and the ground-truth runs. Anything
    after ``--extra`` goes to the job unchanged (``--extra --estimator_l2 100``,
    ``--extra --num_meta_inits 2 --num_train_epochs 10`` for a smoke run).

Cost (2-core CPU, one thread, the job's defaults: 6 meta-initializations, 60 epochs)
    Measured on ``default``: 8.8 min with ``--ground_truth 24`` (132 s meta-initializations,
    110 s for the 42 group-training runs, 263 s for the 48 ground-truth runs of 4-task
    subsets, ~20 s for gradients, estimation and grouping). The other scenarios have 500–960
    nodes (training time scales with the rows), ``many`` has 50 tasks (100 single-task runs).
    Measured for the whole suite (session 6, default 12, with ``default``, ``harder`` and
    ``unequal`` partly resumed): 64 min; ``many`` alone 12 min. The corrected Spearman needs
    at least two seeds. ``--report_only`` rebuilds the table from finished runs in seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_FEATURES = 32
SPLIT_FRACTIONS = (0.2, 0.2, 0.6)
STRATEGIES = ("grouped", "validated groups", "all tasks", "single task", "planted groups")


# --------------------------------------------------------------------------- constructions
@dataclass
class Construction:
    """What a SNAP-format process made, before it is written and read back.

    ``communities`` hold node ids of a pool ``0 .. num_nodes - 1``; ``groups`` the planted group
    of each community (``None``: nothing planted); ``x`` node features of the whole pool (``None``:
    the SNAP loader's structural features); ``signatures`` the feature direction of each
    community's members (for the tests); ``expected`` the right answer by construction.
    """

    name: str
    num_nodes: int
    communities: list[np.ndarray]
    task_names: list[str]
    groups: list[int] | None
    edges: np.ndarray
    x: np.ndarray | None
    expected: str
    params: dict[str, Any]
    signatures: np.ndarray | None = None
    job_args: list[str] = field(default_factory=list)


@dataclass
class Built:
    """A scenario ready for the job: a saved graph (``--dataset``) and its planted partition."""

    name: str
    dataset: Path
    planted: list[int] | None
    expected: str
    num_tasks: int
    snap_dir: Path | None = None
    job_args: list[str] = field(default_factory=list)
    description: str = ""


def _er_block(rng: np.random.Generator, nodes: np.ndarray, degree: float) -> np.ndarray:
    """Erdős–Rényi edges on ``nodes`` with expected degree ``degree`` (``[2, E]``)."""
    nodes = np.asarray(nodes)
    m = len(nodes)
    if m < 2 or degree <= 0:
        return np.zeros((2, 0), np.int64)
    p = min(1.0, degree / (m - 1))
    i, j = np.triu_indices(m, 1)
    keep = rng.random(len(i)) < p
    return np.stack([nodes[i[keep]], nodes[j[keep]]]).astype(np.int64)


def _chung_lu_block(
    rng: np.random.Generator, nodes: np.ndarray, weights: np.ndarray, degree: float
) -> np.ndarray:
    """Chung–Lu edges on ``nodes``: P(u, v) ∝ w_u w_v, mean degree ``degree`` (heavy tails
    follow the weights)."""
    nodes = np.asarray(nodes)
    m = len(nodes)
    if m < 2 or degree <= 0:
        return np.zeros((2, 0), np.int64)
    w = np.asarray(weights, float)
    i, j = np.triu_indices(m, 1)
    p = np.minimum(1.0, degree * w[i] * w[j] / (w.mean() * w.sum()))
    keep = rng.random(len(i)) < p
    return np.stack([nodes[i[keep]], nodes[j[keep]]]).astype(np.int64)


def _background(rng: np.random.Generator, num_nodes: int, degree: float) -> np.ndarray:
    """Uniform random edges, mean degree ``degree`` over ``num_nodes`` nodes."""
    n_edges = rng.poisson(degree * num_nodes / 2)
    return rng.integers(0, num_nodes, size=(2, n_edges)).astype(np.int64)


def _clean_edges(edges: list[np.ndarray]) -> np.ndarray:
    e = np.concatenate(edges, axis=1)
    e = e[:, e[0] != e[1]]
    return np.unique(np.sort(e, axis=0), axis=1)


def _direction(rng: np.random.Generator, strength: float, num_features: int = NUM_FEATURES):
    """A random feature direction with the generator's scale (``strength · √F / 4``)."""
    v = rng.standard_normal(num_features)
    return v / np.linalg.norm(v) * strength * np.sqrt(num_features) / 4


def _planted_features(
    rng: np.random.Generator,
    num_nodes: int,
    communities: Sequence[np.ndarray],
    signatures: np.ndarray,
    offsets: np.ndarray | None = None,
    shared: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> np.ndarray:
    """Gaussian noise; every member of community c gets ``signatures[c]`` (once per distinct
    signature: members of two communities with one group signature get it once) plus
    ``offsets[c]``; ``shared`` adds ``(nodes, vector)`` pairs (region-wide signatures)."""
    x = rng.standard_normal((num_nodes, signatures.shape[1]))
    distinct: dict[bytes, tuple[np.ndarray, set[int]]] = {}
    for c, members in enumerate(communities):
        key = signatures[c].tobytes()
        distinct.setdefault(key, (signatures[c], set()))[1].update(map(int, members))
    for vector, nodes in distinct.values():
        x[sorted(nodes)] += vector
    if offsets is not None:
        for c, members in enumerate(communities):
            x[members] += offsets[c]
    for nodes, vector in shared:
        x[nodes] += vector
    return x.astype(np.float32)


def make_unequal(seed: int = 0) -> Construction:
    """Unequal families and lone tasks, nested like SNAP's near-duplicate top communities.

    Process (an affiliation graph, not the default generator): each family f has a parent set
    of 90 fresh nodes; each of its communities keeps a random 70–90 % of the parent (nested
    near-duplicates, Jaccard ≈ 0.65 within a family) plus 3 stray members from other families'
    parents. Family sizes 6, 4, 3 and 2; 5 lone communities of 70 fresh nodes each share no
    member with any other community. Edges: every community wires its members at expected
    degree 5 (a node in several communities of its family gets more edges, as in the AGM
    behind SNAP's ground-truth communities), plus uniform background edges (mean degree 2).
    Features: Gaussian noise, one signature per family on all its members (each lone task has
    its own), weak per-community offsets, as in the default.

    Planted: the 4 families and 5 singletons (k = 9). Right answer: the planted groups; the lone
    tasks only need their own model (they may also ride along in any group without gain).
    """
    rng = np.random.default_rng(seed)
    family_sizes, num_lone, parent_size, lone_size = (6, 4, 3, 2), 5, 90, 70
    num_nodes = len(family_sizes) * parent_size + num_lone * lone_size
    order = rng.permutation(num_nodes)
    parents = [order[f * parent_size : (f + 1) * parent_size] for f in range(len(family_sizes))]
    lone_pool = order[len(family_sizes) * parent_size :]
    communities, names, groups = [], [], []
    for f, size in enumerate(family_sizes):
        others = np.concatenate([p for g, p in enumerate(parents) if g != f])
        for k in range(size):
            keep = rng.uniform(0.7, 0.9)
            kept = parents[f][rng.random(parent_size) < keep]
            strays = rng.choice(others, size=3, replace=False)
            communities.append(np.union1d(kept, strays))
            names.append(f"f{f}_c{k}")
            groups.append(f)
    for i in range(num_lone):
        communities.append(np.sort(lone_pool[i * lone_size : (i + 1) * lone_size]))
        names.append(f"lone{i}")
        groups.append(len(family_sizes) + i)
    edges = [_er_block(rng, c, 5.0) for c in communities] + [_background(rng, num_nodes, 2.0)]
    group_sig = {g: _direction(rng, 0.6) for g in sorted(set(groups))}
    signatures = np.stack([group_sig[g] for g in groups])
    offsets = np.stack([_direction(rng, 0.1) for _ in communities])
    x = _planted_features(rng, num_nodes, communities, signatures, offsets)
    return Construction(
        name="unequal", num_nodes=num_nodes, communities=communities, task_names=names,
        groups=groups, edges=_clean_edges(edges), x=x, expected="planted",
        params={"family_sizes": family_sizes, "num_lone": num_lone, "parent_size": parent_size,
                "lone_size": lone_size, "keep": [0.7, 0.9], "strays": 3, "community_degree": 5,
                "background_degree": 2, "signature_strength": 0.6, "community_strength": 0.1,
                "seed": seed},
        signatures=signatures, job_args=["--max_task_groups", "12"],
    )  # fmt: skip


def make_interfere(seed: int = 0) -> Construction:
    """Tasks that only interfere: nothing one task learns is of use to another.

    Process: 8 blocks of 120 fresh nodes; each block is split at random into two halves, the
    positives of a *conflict pair* of tasks (16 tasks): the two communities of a pair are
    disjoint (a node of the block is positive for exactly one of them, their labels are
    perfectly anti-correlated on the block) but the block is wired as one (edges at expected
    degree 6 across the whole block), so the graph, and with it every propagated SIGN hop,
    says "one community" where the labels say two. Their feature signatures are opposite
    (``s_B = −s_A``, strength 2.0: strong enough for a task alone), so the hop features of the block average the two out, and each task
    needs its own one-sided unit in the shared trunk (a ReLU unit on ``s_A`` is silent on B's
    members). Blocks carry independent random signatures and share no member; background edges
    mean degree 1.5.

    Planted: nothing (no two tasks share a positive, a signature or a useful neighbourhood).
    Right answer: one model per task; one model on all tasks can only lose capacity to the
    others (a narrow trunk, 16 unrelated detectors). No grouping of two or more tasks should
    beat the better trivial answer beyond noise.
    """
    rng = np.random.default_rng(seed)
    num_blocks, block_size = 8, 120
    num_nodes = num_blocks * block_size
    order = rng.permutation(num_nodes)
    communities, names, signatures, edges = [], [], [], []
    for b in range(num_blocks):
        block = order[b * block_size : (b + 1) * block_size]
        half = rng.permutation(block)
        communities += [np.sort(half[: block_size // 2]), np.sort(half[block_size // 2 :])]
        names += [f"p{b}_a", f"p{b}_b"]
        s = _direction(rng, 2.0)
        signatures += [s, -s]
        edges.append(_er_block(rng, block, 6.0))
    edges.append(_background(rng, num_nodes, 1.5))
    signatures = np.stack(signatures)
    x = _planted_features(rng, num_nodes, communities, signatures)
    return Construction(
        name="interfere", num_nodes=num_nodes, communities=communities, task_names=names,
        groups=None, edges=_clean_edges(edges), x=x, expected="single",
        params={"num_pairs": num_blocks, "block_size": block_size, "block_degree": 6,
                "background_degree": 1.5, "signature_strength": 2.0, "seed": seed},
        signatures=signatures,
    )  # fmt: skip


def make_weak(seed: int = 0) -> Construction:
    """Weaker overlap between group members: a group is a topic, not a set of near-duplicates.

    Process (Bernoulli affiliation, not the default generator's core + private members): each
    of 4 groups owns a region of 160 nodes; each of its 4 communities takes every region node
    independently with probability 0.4 (about 64 members; two communities of one group share
    about 26, Jaccard ≈ 0.25, against 0.86 in the default). The region carries a weak group
    signature (strength 0.3, on every region node, members or not); each community its own
    offset (0.3). Edges: expected degree 5 inside each community, 1.5 inside each region, plus
    background (1.5). Communities of different groups share nothing.

    Planted: the 4 groups. Right answer: the planted groups if the weaker overlap still
    transfers, otherwise the better trivial answer; the suite says which.
    """
    rng = np.random.default_rng(seed)
    num_groups, per_group, region_size, p_member = 4, 4, 160, 0.4
    num_nodes = num_groups * region_size
    order = rng.permutation(num_nodes)
    communities, names, groups, edges, shared = [], [], [], [], []
    for g in range(num_groups):
        region = order[g * region_size : (g + 1) * region_size]
        shared.append((region, _direction(rng, 0.3)))
        edges.append(_er_block(rng, region, 1.5))
        for k in range(per_group):
            members = np.sort(region[rng.random(region_size) < p_member])
            communities.append(members)
            names.append(f"g{g}_c{k}")
            groups.append(g)
            edges.append(_er_block(rng, members, 5.0))
    edges.append(_background(rng, num_nodes, 1.5))
    signatures = np.stack([_direction(rng, 0.3) for _ in communities])
    x = _planted_features(rng, num_nodes, communities, signatures, shared=shared)
    return Construction(
        name="weak", num_nodes=num_nodes, communities=communities, task_names=names,
        groups=groups, edges=_clean_edges(edges), x=x, expected="planted (if it transfers)",
        params={"num_groups": num_groups, "tasks_per_group": per_group,
                "region_size": region_size, "p_member": p_member, "group_strength": 0.3,
                "community_strength": 0.3, "community_degree": 5, "region_degree": 1.5,
                "background_degree": 1.5, "seed": seed},
        signatures=signatures,
    )  # fmt: skip


def make_none(seed: int = 0) -> Construction:
    """No structure at all: independent random communities.

    Process: 16 communities, each a uniform random sample of 70 of 800 nodes, drawn
    independently (two communities share about 6 members, what chance gives: Jaccard ≈ 0.05),
    each with its own random feature signature (strength 1.5, so that a task alone is
    learnable); edges at expected degree 8 inside each community plus background (mean
    degree 2).

    Planted: nothing. Right answer: one model on all tasks or one per task, whichever real
    training favours; a non-trivial grouping should not beat the better of the two.
    """
    rng = np.random.default_rng(seed)
    num_tasks, num_nodes, size = 16, 800, 70
    communities = [
        np.sort(rng.choice(num_nodes, size=size, replace=False)) for _ in range(num_tasks)
    ]
    edges = [_er_block(rng, c, 8.0) for c in communities] + [_background(rng, num_nodes, 2.0)]
    signatures = np.stack([_direction(rng, 1.5) for _ in communities])
    x = _planted_features(rng, num_nodes, communities, signatures)
    return Construction(
        name="none", num_nodes=num_nodes, communities=communities,
        task_names=[f"t{i}" for i in range(num_tasks)], groups=None, edges=_clean_edges(edges),
        x=x, expected="all or single",
        params={"num_tasks": num_tasks, "num_nodes": num_nodes, "size": size,
                "community_degree": 8, "background_degree": 2, "signature_strength": 1.5,
                "seed": seed},
        signatures=signatures,
    )  # fmt: skip


HEAVY_FAMILIES = (8, 5, 3, 2, 2, 1, 1, 1, 1)


def make_heavy(seed: int = 0) -> Construction:
    """A heavy-tailed, SNAP-like community mix (LFR-like sizes and degrees, AGM-like edges).

    Process: 24 communities in families of heavy-tailed sizes 8, 5, 3, 2, 2, 1, 1, 1, 1 (one
    large family of nested near-duplicates, a few small ones and lone communities, as among
    the top communities of SNAP's dblp or amazon). Each family has a root whose size follows a
    power law (exponent 2, 40–250 nodes): 80 % fresh nodes of the family's own, 20 % drawn from
    the whole pool with probability ∝ a heavy-tailed node activity (Pareto, α = 1.5, capped at
    30), so hub
    nodes belong to several families, as in real data. Each community keeps a random 55–95 %
    of its root (sizes spread over a decade). Edges: Chung–Lu inside each community (expected
    degree 5 scaled by the activity: heavy-tailed degrees) plus Chung–Lu background (mean
    degree 2). Features: none planted; the job sees the SNAP loader's spectral features (128
    leading eigenvectors), exactly as for real SNAP data.

    Planted: the 9 families (4 of them singletons). Right answer: the planted families; hub
    overlap between families and the lack of feature signatures make it harder than the
    default.
    """
    rng = np.random.default_rng(seed)
    roots_sizes = np.clip(40 * (1 - rng.random(len(HEAVY_FAMILIES))) ** (-1 / 1.0), 40, 250)
    roots_sizes = np.round(roots_sizes).astype(int)
    own = [int(round(0.8 * s)) for s in roots_sizes]
    num_nodes = int(sum(own) + 200)  # 200 nodes only ever join as hubs
    activity = np.minimum(1 + rng.pareto(1.5, num_nodes), 30.0)  # heavy tail, capped
    order = rng.permutation(num_nodes)
    starts = np.cumsum([0, *own])
    communities, names, groups = [], [], []
    for f, size in enumerate(HEAVY_FAMILIES):
        home = order[starts[f] : starts[f + 1]]
        outside = np.setdiff1d(np.arange(num_nodes), home)
        p = activity[outside] / activity[outside].sum()
        hubs = rng.choice(outside, size=int(roots_sizes[f]) - len(home), replace=False, p=p)
        root = np.union1d(home, hubs)
        for k in range(size):
            keep = rng.uniform(0.55, 0.95)
            members = root[rng.random(len(root)) < keep]
            communities.append(np.sort(members))
            names.append(f"f{f}_c{k}" if size > 1 else f"lone{f}")
            groups.append(f)
    edges = [_chung_lu_block(rng, c, activity[c], 5.0) for c in communities]
    edges.append(_chung_lu_block(rng, np.arange(num_nodes), activity, 2.0))
    return Construction(
        name="heavy", num_nodes=num_nodes, communities=communities, task_names=names,
        groups=groups, edges=_clean_edges(edges), x=None, expected="planted",
        params={"family_sizes": HEAVY_FAMILIES, "root_sizes": roots_sizes.tolist(),
                "root_exponent": 2.0, "hub_share": 0.2, "activity_pareto": 1.5,
                "keep": [0.55, 0.95], "community_degree": 5, "background_degree": 2,
                "features": "spectral (SNAP loader)", "seed": seed},
        job_args=["--max_task_groups", "12"],
    )  # fmt: skip


def make_many(seed: int = 0) -> Construction:
    """Many tasks (50) from a cheap process, on a graph small enough for 50 single-task runs.

    Process (block Bernoulli): 10 blocks of 50 fresh nodes; each of a block's 5 communities
    takes every block node with probability 0.6 (30 members; Jaccard ≈ 0.43 within a block).
    Every block has its own signature (strength 0.6) on its communities' members, each
    community a weak offset (0.1); edges at expected degree 5 inside each community plus
    background (mean degree 1.5). 500 nodes.

    Planted: the 10 blocks. Right answer: the planted groups (ten signatures do not fit the
    narrow trunk of one model on all tasks, one task alone has 6 training positives).
    """
    rng = np.random.default_rng(seed)
    num_groups, per_group, block_size, p_member = 10, 5, 50, 0.6
    num_nodes = num_groups * block_size
    order = rng.permutation(num_nodes)
    communities, names, groups, edges = [], [], [], []
    for g in range(num_groups):
        block = order[g * block_size : (g + 1) * block_size]
        for k in range(per_group):
            members = np.sort(block[rng.random(block_size) < p_member])
            communities.append(members)
            names.append(f"g{g}_c{k}")
            groups.append(g)
            edges.append(_er_block(rng, members, 5.0))
    edges.append(_background(rng, num_nodes, 1.5))
    group_sig = [_direction(rng, 0.6) for _ in range(num_groups)]
    signatures = np.stack([group_sig[g] for g in groups])
    offsets = np.stack([_direction(rng, 0.1) for _ in communities])
    x = _planted_features(rng, num_nodes, communities, signatures, offsets)
    return Construction(
        name="many", num_nodes=num_nodes, communities=communities, task_names=names,
        groups=groups, edges=_clean_edges(edges), x=x, expected="planted",
        params={"num_groups": num_groups, "tasks_per_group": per_group,
                "block_size": block_size, "p_member": p_member, "signature_strength": 0.6,
                "community_strength": 0.1, "community_degree": 5, "background_degree": 1.5,
                "seed": seed},
        signatures=signatures, job_args=["--max_task_groups", "13"],
    )  # fmt: skip


# --------------------------------------------------------------------------- SNAP files
def write_snap(snap_dir: Path, name: str, edges: np.ndarray, communities: Sequence[np.ndarray]):
    """``com-<name>.ungraph.txt`` (one ``u<TAB>v`` line per edge, ``#`` header) and
    ``com-<name>.top5000.cmty.txt`` (one community per line), SNAP's layout."""
    snap_dir = Path(snap_dir)
    snap_dir.mkdir(parents=True, exist_ok=True)
    nodes = np.unique(edges)
    lines = [
        f"# Undirected graph: scenario {name} (benchmarks/scenarios.py)",
        f"# Nodes: {len(nodes)} Edges: {edges.shape[1]}",
        "# FromNodeId\tToNodeId",
    ]
    lines += [f"{u}\t{v}" for u, v in edges.T]
    (snap_dir / f"com-{name}.ungraph.txt").write_text("\n".join(lines) + "\n")
    cmty = ["\t".join(map(str, np.sort(c))) for c in communities]
    (snap_dir / f"com-{name}.top5000.cmty.txt").write_text("\n".join(cmty) + "\n")


def materialize(cons: Construction, out_dir: Path, split_seed: int = 0) -> Built:
    """Write ``cons`` as SNAP files, read them back with :func:`load_snap_communities`, put the
    tasks back in construction order with their names and planted groups, save the graph."""
    from hf_tae.families.graph.data import CommunityGraph
    from hf_tae.families.graph.snap import load_snap_communities

    out_dir = Path(out_dir)
    snap_dir = out_dir / "snap"
    write_snap(snap_dir, cons.name, cons.edges, cons.communities)
    union = np.unique(np.concatenate(cons.communities))
    features = "spectral" if cons.x is None else cons.x[union]
    loaded = load_snap_communities(
        snap_dir, cons.name, num_communities=len(cons.communities),
        split_fractions=SPLIT_FRACTIONS, seed=split_seed, node_features=features,
    )  # fmt: skip
    # the loader orders tasks by size; restore the construction's order (line order)
    line = loaded.info["community_line"]
    order = np.argsort(line)
    groups = None if cons.groups is None else [cons.groups[i] for i in sorted(line)]
    graph = CommunityGraph(
        x=loaded.x,
        edge_index=loaded.edge_index,
        labels=loaded.labels[:, order],
        split=loaded.split[:, order],
        task_names=[cons.task_names[i] for i in sorted(line)],
        task_groups=groups,
        node_ids=loaded.node_ids,
        info={**loaded.info, "name": f"scenario-{cons.name}", "community_line": sorted(line),
              "process": f"benchmarks/scenarios.py:make_{cons.name}", "params": cons.params},
    )  # fmt: skip
    graph.check()
    dataset = graph.save(out_dir / "graph", overwrite=True)
    return Built(
        name=cons.name, dataset=dataset, planted=groups, expected=cons.expected,
        num_tasks=graph.num_tasks, snap_dir=snap_dir, job_args=list(cons.job_args),
    )  # fmt: skip


def _from_generator(name: str, out_dir: Path, expected: str, **kwargs) -> Built:
    from hf_tae.families.graph.generator import generate_community_graph

    graph = generate_community_graph(**kwargs)
    dataset = graph.save(Path(out_dir) / "graph", overwrite=True)
    return Built(name=name, dataset=dataset, planted=list(graph.task_groups),
                 expected=expected, num_tasks=graph.num_tasks)  # fmt: skip


def build_default(out_dir: Path, seed: int = 0) -> Built:
    """The embedded default, ``generate_community_graph()``, for reference: 4 groups × 4
    near-duplicate communities (whole group core + 5 private members each, Jaccard ≈ 0.86),
    group feature signatures, background nodes. Planted: the 4 groups; right answer: them
    (README: planted 0.927 vs all 0.821 vs single 0.560 test F1)."""
    return _from_generator("default", out_dir, "planted", seed=seed)


def build_harder(out_dir: Path, seed: int = 0) -> Built:
    """The harder generator setting, ``generate_community_graph(core_keep=0.8,
    private_size=25)``: each community keeps 80 % of its group's core and adds 25 private
    members, so group members conflict on their private members. Planted: the 4 groups; right
    answer: the planted groups, but close to all tasks (README: 0.630 vs 0.607)."""
    return _from_generator(
        "harder", out_dir, "planted (≈ all)", core_keep=0.8, private_size=25, seed=seed
    )


def _snap_builder(make: Callable[[int], Construction]) -> Callable[..., Built]:
    def build(out_dir: Path, seed: int = 0) -> Built:
        return materialize(make(seed), out_dir)

    build.__doc__ = make.__doc__
    build.__name__ = make.__name__.replace("make_", "build_")
    return build


SCENARIOS: dict[str, Callable[..., Built]] = {
    "default": build_default,
    "harder": build_harder,
    "unequal": _snap_builder(make_unequal),
    "interfere": _snap_builder(make_interfere),
    "weak": _snap_builder(make_weak),
    "none": _snap_builder(make_none),
    "heavy": _snap_builder(make_heavy),
    "many": _snap_builder(make_many),
}


# --------------------------------------------------------------------------- the job
def job_argv(built: Built, run_dir: Path, seeds: Sequence[int], ground_truth: int,
             extra: Sequence[str]) -> list[str]:  # fmt: skip
    """The ``hf-tae run graph`` arguments of one scenario (``extra`` last: it wins)."""
    seeds = [str(s) for s in seeds]
    argv = ["--dataset", str(built.dataset), "--output_dir", str(run_dir),
            "--group_seeds", *seeds, "--disable_tqdm", "true", *built.job_args]  # fmt: skip
    if ground_truth:
        argv += ["--ground_truth", str(ground_truth), "--ground_truth_seeds", *seeds]
    return argv + list(extra)


def per_seed_scores(run_dir: Path, results: dict[str, Any], metric: str) -> dict[str, list[float]]:
    """Per strategy, the per-seed test ``metric`` averaged over tasks, from the group-training
    runs on disk (``group_training/results.jsonl``: one record per (subset, seed))."""
    from hf_tae.evaluation.ground_truth import RESULTS_FILE, _read_jsonl

    names = results["tasks"]
    scores: dict[tuple[frozenset[str], int], dict[str, float]] = {}
    for record in _read_jsonl(Path(run_dir) / "group_training" / RESULTS_FILE):
        if record["split"] != "test":
            continue
        rows = {row["task_name"]: row[metric] for row in record["rows"]}
        scores[(frozenset(rows), int(record["seed"]))] = rows
    partitions = {
        "grouped": results["grouping"]["groups"],
        "all tasks": [names],
        "single task": [[t] for t in names],
    }
    validated = results.get("group_training", {}).get("validated_groups")
    if validated is not None:  # the job split groups that validated worse than their tasks alone
        partitions["validated groups"] = validated
    planted = results.get("planted_groups")
    if planted is not None:
        partitions["planted groups"] = planted
    seeds = sorted({seed for _, seed in scores})
    out: dict[str, list[float]] = {}
    for strategy, groups in partitions.items():
        values = []
        for seed in seeds:
            per_task = [scores.get((frozenset(g), seed), {}).get(t) for g in groups for t in g]
            if any(v is None for v in per_task):
                break  # a strategy not trained (e.g. --compare_single_tasks false)
            values.append(float(np.mean(per_task)))
        else:
            out[strategy] = values
    return out


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def summarize(built: Built, results: dict[str, Any], run_dir: Path, seconds: float) -> dict:
    """One table row from the job's results and the per-seed runs."""
    metric = results["metrics"]["selection"]
    names = results["tasks"]
    if built.planted is not None:
        by_group: dict[int, list[str]] = {}
        for name, g in zip(names, built.planted, strict=True):
            by_group.setdefault(int(g), []).append(name)
        results = {**results, "planted_groups": list(by_group.values())}
    grouping = results.get("grouping", {})
    row: dict[str, Any] = {
        "scenario": built.name,
        "tasks": len(names),
        "expected": built.expected,
        "planted_k": None if built.planted is None else len(set(built.planted)),
        "k": grouping.get("k"),
        "k_choice": grouping.get("k_choice"),
        "ari": grouping.get("adjusted_rand_vs_planted"),
        "groups": grouping.get("groups"),
        "seconds": round(seconds, 1),
        "resumed": bool(results.get("meta_init", {}).get("reused")),
        "l2": results.get("estimation", {}).get("estimator_l2"),
        "metric": metric,
    }
    summary = results.get("group_training", {}).get("summary", {})
    seeds = per_seed_scores(run_dir, results, metric) if "group_training" in results else {}
    for strategy in STRATEGIES:
        mean = summary.get(strategy, {}).get(metric)
        row[strategy] = mean
        row[f"{strategy} per seed"] = seeds.get(strategy)
        row[f"{strategy} sd"] = _sd(seeds[strategy]) if strategy in seeds else None
    trivial = {s: row[s] for s in ("all tasks", "single task") if row[s] is not None}
    if row["grouped"] is not None and trivial:
        best = max(trivial, key=trivial.get)
        noise = np.nanmax([row["grouped sd"] or np.nan, row[f"{best} sd"] or np.nan, 0.0])
        gap = row["grouped"] - trivial[best]
        row.update(best_trivial=best, best_trivial_score=trivial[best], gap=gap, noise=noise,
                   verdict="better" if gap > noise else "ok" if gap >= -noise else "worse")  # fmt: skip
        # the job's recommendation: whichever of grouped / validated / all / single validates best
        rec = results.get("group_training", {}).get("recommended")
        if rec is not None:
            strategy = rec["strategy"]
            noise = np.nanmax([row[f"{strategy} sd"] or np.nan, row[f"{best} sd"] or np.nan, 0.0])
            gap = row[strategy] - trivial[best]
            row.update(recommended=strategy, recommended_score=row[strategy], recommended_gap=gap,
                       recommended_verdict="better" if gap > noise else "ok" if gap >= -noise
                       else "worse")  # fmt: skip
    truth = results.get("ground_truth", {})
    row["spearman"] = truth.get("affinity", {}).get("spearman")
    row["corrected_spearman"] = truth.get("corrected_spearman")
    row["estimate_self_agreement"] = (
        results.get("estimation", {}).get("self_agreement", {}).get("mean_spearman")
    )
    row["truth_self_agreement"] = truth.get("truth_self_agreement", {}).get("mean_spearman")
    return row


def run_scenario(name: str, output_dir: Path, seeds: Sequence[int], ground_truth: int,
                 extra: Sequence[str], verbose: bool = False,
                 data_seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Build scenario ``name`` under ``output_dir/name`` and run the job on it; one row."""
    from hf_tae.pipeline.run import run

    scenario_dir = Path(output_dir) / name
    scenario_dir.mkdir(parents=True, exist_ok=True)
    run_dir = scenario_dir / "run"
    log_path = scenario_dir / "job.log"
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if not verbose:  # the Trainer's log lines and the stage logs go to job.log
            log = stack.enter_context(log_path.open("a"))
            stack.enter_context(contextlib.redirect_stdout(log))
            stack.enter_context(contextlib.redirect_stderr(log))
            handler = logging.StreamHandler(log)
            root = logging.getLogger()
            root.addHandler(handler)
            root.setLevel(logging.INFO)
            stack.callback(root.removeHandler, handler)
        built = SCENARIOS[name](scenario_dir / "data", seed=data_seed)
        argv = job_argv(built, run_dir, seeds, ground_truth, extra)
        print(f"\n$ hf-tae run graph {shlex.join(argv)}", flush=True)
        results = run(argv, family="graph")
    row = summarize(built, results, run_dir, time.perf_counter() - start)
    row["command"] = "hf-tae run graph " + shlex.join(argv)
    (scenario_dir / "row.json").write_text(json.dumps(row, indent=2, default=float))
    return row


def report_scenario(name: str, output_dir: Path, data_seed: int = 0) -> dict[str, Any]:
    """The row of a finished scenario run (``--report_only``): its data rebuilt (cheap, seeded),
    its results read back; the time is the one the run recorded."""
    scenario_dir = Path(output_dir) / name
    run_dir = scenario_dir / "run"
    if not (run_dir / "results.json").is_file():
        raise FileNotFoundError(f"{run_dir}/results.json: run the scenario first")
    previous = json.loads((scenario_dir / "row.json").read_text()) if (
        scenario_dir / "row.json").is_file() else {}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        built = SCENARIOS[name](scenario_dir / "data", seed=data_seed)
    results = json.loads((run_dir / "results.json").read_text())
    row = summarize(built, results, run_dir, float(previous.get("seconds", float("nan"))))
    row["command"] = previous.get("command")
    return row


# --------------------------------------------------------------------------- report
def _f(value, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return format(value, fmt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["scenario", "tasks", "right answer (by construction)", "planted k", "λ", "chosen k",
            "k choice", "ARI", "chosen", "validated", "all", "single", "planted", "best trivial",
            "chosen − best trivial (± noise)", "verdict", "recommended (validation)",
            "its verdict", "corr. Spearman",
            "self-agr. est / truth", "time"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scenario']} | " + " | ".join(["-"] * 16)
                         + f" | error: {r['error']} | - | - | - |")  # fmt: skip
            continue
        choice = (r["k_choice"] or "-").replace("predicted payoff: ", "payoff: ")
        gap = "-" if r.get("gap") is None else f"{r['gap']:+.3f} (± {r['noise']:.3f})"
        best = "-" if r.get("best_trivial") is None else r["best_trivial"].split()[0]
        minutes = _f(r["seconds"] / 60, ".1f")  # "-": a resumed run that recorded no time
        time_s = (minutes + " min" if minutes != "-" else "-") + (" (resumed)" if r["resumed"] else "")
        lines.append("| " + " | ".join([
            r["scenario"], str(r["tasks"]), r["expected"], _f(r["planted_k"], "d"),
            _f(r.get("l2"), "g"), _f(r["k"], "d"), choice, _f(r["ari"], ".2f"), _f(r["grouped"]), _f(r.get("validated groups")), _f(r["all tasks"]),
            _f(r["single task"]), _f(r["planted groups"]), best, gap, r.get("verdict", "-"),
            "-" if r.get("recommended") is None else
            f"{r['recommended'].split()[0]} {_f(r['recommended_score'])}",
            r.get("recommended_verdict", "-"),
            _f(r["corrected_spearman"], ".2f"),
            f"{_f(r['estimate_self_agreement'], '.2f')} / {_f(r['truth_self_agreement'], '.2f')}",
            time_s,
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    if not rows:
        return
    labels = {"grouped": "chosen groups", "validated groups": "validated groups",
              "all tasks": "all tasks", "single task": "single task",
              "planted groups": "planted groups"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(rows) + 2), 4.4))
    width = 0.16
    xs = np.arange(len(rows))
    for i, strategy in enumerate(STRATEGIES):
        means = [r[strategy] if r[strategy] is not None else np.nan for r in rows]
        errs = [np.nan_to_num(r[f"{strategy} sd"] or 0.0) for r in rows]
        ax.bar(xs + (i - 2) * width, means, width, yerr=errs, capsize=2,
               label=labels[strategy])  # fmt: skip
    ax.set_xticks(xs, [f"{r['scenario']}\n({r['tasks']} tasks, k={r['k']})" for r in rows],
                  fontsize=8)  # fmt: skip
    ax.set_ylabel(f"test {rows[0]['metric'].upper()} (mean over tasks and seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_title("One model per chosen group (and per validated group) vs all tasks vs single tasks "
                 "vs planted groups\n"
                 "(real training, test split; error bars: sd over seeds)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS),
                        choices=list(SCENARIOS), help="Scenarios to run, in this order.")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="Group-training and ground-truth seeds.")  # fmt: skip
    parser.add_argument("--data_seed", type=int, default=0,
                        help="Seed of the scenarios' data: another value builds fresh instances "
                        "of the same processes (a held-out check of settings chosen on seed 0).")  # fmt: skip
    parser.add_argument("--ground_truth", type=int, default=12,
                        help="Sampled subsets fine-tuned for real per scenario (0: skip).")  # fmt: skip
    parser.add_argument("--output_dir", default="/tmp/scenarios",
                        help="One resumable folder per scenario under it.")  # fmt: skip
    parser.add_argument("--results_dir", default=str(REPO / "benchmarks" / "results"),
                        help="Where <results_name>.txt and .png go.")  # fmt: skip
    parser.add_argument("--results_name", default="scenarios")
    parser.add_argument("--verbose", action="store_true",
                        help="Job logs on the console instead of <scenario>/job.log.")  # fmt: skip
    parser.add_argument("--report_only", action="store_true",
                        help="Rebuild the table and plot from the finished runs under "
                        "--output_dir without running anything.")  # fmt: skip
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="Everything after it goes to the job (hf-tae run graph flags).")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    command = "python benchmarks/scenarios.py " + shlex.join(
        list(sys.argv[1:] if argv is None else argv)
    )
    output_dir = Path(args.output_dir)
    rows = []
    start = time.perf_counter()
    for name in args.scenarios:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: running (log: "
              f"{output_dir / name / 'job.log'})", flush=True)  # fmt: skip
        try:
            if args.report_only:
                row = report_scenario(name, output_dir, args.data_seed)
            else:
                row = run_scenario(name, output_dir, args.seeds, args.ground_truth, args.extra,
                                   args.verbose, args.data_seed)  # fmt: skip
        except Exception as err:  # one broken scenario must not cost the others
            traceback.print_exc()
            row = {"scenario": name, "error": f"{type(err).__name__}: {err}"[:200]}
        rows.append(row)
        if "error" not in row:
            print(f"    k={row['k']} ARI={_f(row['ari'], '.2f')} chosen={_f(row['grouped'])} "
                  f"all={_f(row['all tasks'])} single={_f(row['single task'])} "
                  f"planted={_f(row['planted groups'])} verdict={row.get('verdict', '-')} "
                  f"({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    total = time.perf_counter() - start
    table = markdown_table(rows)
    legend = (
        "chosen / validated / all / single / planted: real test F1 (mean over tasks and seeds) "
        "of one model per chosen group / per chosen group with the groups that validated worse "
        "than their tasks alone split (\"-\": none was) / on all tasks / per task / per planted "
        "group. verdict: ok when chosen "
        "≥ best trivial − noise (noise: the larger seed-to-seed sd of the per-seed average), "
        "better when above best trivial + noise. recommended: the job's final answer, whichever "
        "of chosen / validated / all / single scores best on validation rows (the same runs), with its real "
        "test F1 and verdict. self-agr.: mean Spearman between "
        "meta-initializations' estimated affinities / between seeds' fine-tuned affinities."
    )
    text = f"{table}\n\n{legend}\n\nTotal: {total / 60:.1f} min.\n\nCommand: `{command}`\n"
    print("\n" + text)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{args.results_name}.txt").write_text(text)
    plot(rows, results_dir / f"{args.results_name}.png")
    (output_dir / "rows.json").write_text(json.dumps(rows, indent=2, default=float))
    print(f"Wrote {results_dir / (args.results_name + '.txt')} and "
          f"{results_dir / (args.results_name + '.png')}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
