"""metamd_jax: Meta Mirror Descent, a meta-learned Bregman divergence as an optax optimiser."""

from metamd_jax.divergence import (
    DiagonalMetric,
    KroneckerAxes,
    KroneckerMetric,
    ScalarMetric,
    bregman_divergence,
    check_divergence,
    convergence_bound,
    init_divergence,
    strong_convexity,
)
from metamd_jax.mirror import mirror_step
from metamd_jax.transform import ScaleByMirrorDescentState, metamd, scale_by_mirror_descent

__version__ = '0.1.0'

__all__ = (
    'DiagonalMetric',
    'KroneckerAxes',
    'KroneckerMetric',
    'ScalarMetric',
    'ScaleByMirrorDescentState',
    'bregman_divergence',
    'check_divergence',
    'convergence_bound',
    'init_divergence',
    'metamd',
    'mirror_step',
    'scale_by_mirror_descent',
    'strong_convexity',
)
