"""Per-example gradient capture and seeded random projections (Grad-TAE)."""

from hf_tae.gradients.capture import ProjectedGradientCapture, select_parameters
from hf_tae.gradients.projection import (
    DenseBlock,
    GradientProjector,
    IdentityBlock,
    KroneckerBlock,
    MatrixCache,
    random_matrix,
    stable_seed,
)

__all__ = [
    "DenseBlock",
    "GradientProjector",
    "IdentityBlock",
    "KroneckerBlock",
    "MatrixCache",
    "ProjectedGradientCapture",
    "random_matrix",
    "select_parameters",
    "stable_seed",
]
