"""Tasks as datasets: task sets, community graphs (SNAP and the embedded generator), features."""

from hf_tae.tasks.features import sign_features, structural_features
from hf_tae.tasks.graph import CommunityGraph
from hf_tae.tasks.sampling import TaskBalancedSampler
from hf_tae.tasks.snap import load_snap_communities
from hf_tae.tasks.synthetic import generate_community_graph
from hf_tae.tasks.taskset import TaskSet

__all__ = [
    "CommunityGraph",
    "TaskBalancedSampler",
    "TaskSet",
    "generate_community_graph",
    "load_snap_communities",
    "sign_features",
    "structural_features",
]
