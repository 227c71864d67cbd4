"""Graph communities as tasks: community graphs (SNAP files, the planted generator), SIGN hop
features, and the family that runs them through the pipeline with the SIGN model."""

from hf_tae.families.graph.data import CommunityGraph
from hf_tae.families.graph.features import sign_features, structural_features
from hf_tae.families.graph.generator import generate_community_graph
from hf_tae.families.graph.snap import load_snap_communities

__all__ = [
    "CommunityGraph",
    "generate_community_graph",
    "load_snap_communities",
    "sign_features",
    "structural_features",
]
