"""Steps 5–6 and the end-to-end job: group training comparisons, the run report, and the
graph-community pipeline behind ``hf-tae run`` and ``recipes/graph_communities.py``."""

from hf_tae.pipeline.group_training import compare_group_training, summarize_group_training

__all__ = ["compare_group_training", "summarize_group_training"]
