"""Step 5: group tasks by their affinity matrix (Grad-TAE's SDP clustering, made robust).

numpy in, numpy out. :func:`sdp_cluster` solves the SDP relaxation of the average-density
objective (:func:`partition_objective`) with SCS and rounds it (k-means, always exactly k
groups, or the reference threshold-and-scan); :func:`spectral_cluster`,
:func:`kmeans_cluster` and :func:`exhaustive_cluster` (exact, n ≤ 10) are baselines;
:func:`sweep_k` / :func:`recommend_k` choose k against a shuffled-T null or by
:func:`affinity_silhouette`; :func:`split_incoherent_groups` splits the groups the
meta-initializations do not see as cohesive.
"""

from hf_tae.clustering.baselines import exhaustive_cluster, kmeans_cluster, spectral_cluster
from hf_tae.clustering.rounding import (
    Grouping,
    kmeans_rounding,
    partition_objective,
    threshold_rounding,
)
from hf_tae.clustering.sdp import SdpSolution, sdp_cluster, sdp_relaxation
from hf_tae.clustering.selection import (
    affinity_silhouette,
    affinity_silhouette_samples,
    recommend_k,
    shuffled_null,
    silhouettes_by_member,
    split_incoherent_groups,
    sweep_k,
)

__all__ = [
    "Grouping",
    "SdpSolution",
    "affinity_silhouette",
    "affinity_silhouette_samples",
    "exhaustive_cluster",
    "kmeans_cluster",
    "kmeans_rounding",
    "partition_objective",
    "recommend_k",
    "sdp_cluster",
    "sdp_relaxation",
    "shuffled_null",
    "silhouettes_by_member",
    "spectral_cluster",
    "split_incoherent_groups",
    "sweep_k",
    "threshold_rounding",
]
