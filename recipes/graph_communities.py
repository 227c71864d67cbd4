"""Graph community detection, end to end: meta-initialization → gradients → estimated affinity
→ SDP task groups → one model per group → report (the same job as ``hf-tae run``).

    python recipes/graph_communities.py --output_dir runs/graph_communities
    accelerate launch recipes/graph_communities.py --output_dir runs/graph_communities
    python recipes/graph_communities.py --help

Runs on the embedded default (a planted-community graph, generated in seconds), on SNAP files
(``--snap_dir DIR --snap_name youtube``) or on a saved graph (``--dataset PATH_OR_REPO``).
``--meta_init REPO_OR_PATH`` starts from a published meta-initialization; ``--push_to_hub
--hub_model_id you/name`` publishes the trained one with its model card; ``--ground_truth N``
also fine-tunes N sampled subsets for real and reports estimated against true. Stages and
outputs: :mod:`hf_tae.pipeline.graph_communities`.
"""

import os
import sys

from hf_tae.pipeline.graph_communities import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
