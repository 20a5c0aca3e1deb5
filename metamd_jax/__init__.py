"""metamd_jax: Meta Mirror Descent, a meta-learned Bregman divergence as an optax optimiser."""

from metamd_jax.accelerated import accelerated_metamd, nesterov_momentum
from metamd_jax.adaptive import (
    ScaleByAdaptiveMirrorDescentState,
    adaptive_metamd,
    reference_gradient_norm,
    scale_by_adaptive_mirror_descent,
)
from metamd_jax.artifact import load_divergence, save_divergence
from metamd_jax.blended import (
    ScaleByBlendedMirrorDescentState,
    blended_metamd,
    scale_by_blended_mirror_descent,
)
from metamd_jax.bound import adaptive_regret_bound, regret_bound
from metamd_jax.calibrated import (
    calibrate,
    calibrated_metamd,
    load_calibration,
    load_optimizer,
    save_calibration,
)
from metamd_jax.divergence import (
    DiagonalMetric,
    KroneckerAxes,
    KroneckerMetric,
    ScalarMetric,
    bregman_divergence,
    check_divergence,
    check_structure,
    convergence_bound,
    init_divergence,
    strong_convexity,
)
from metamd_jax.eigenbasis import (
    EigenbasisState,
    eigenbasis_levels,
    eigenbasis_metamd,
    scale_by_eigenbasis_mirror_descent,
)
from metamd_jax.guarded import GuardedState, guarded_switch
from metamd_jax.inner_loop import AdaptiveRollout, Rollout, adaptive_rollout, rollout
from metamd_jax.low_rank import (
    ScaleByLowRankMirrorDescentState,
    low_rank_metamd,
    scale_by_low_rank_mirror_descent,
)
from metamd_jax.meta_train import FitResult, MetaTrainState, fit
from metamd_jax.mirror import mirror_step
from metamd_jax.objectives import MetaGradient, meta_gradient, unrolled_loss
from metamd_jax.restarts import RestartState, doubling_restarts
from metamd_jax.statistics import statistics_prior
from metamd_jax.tasks import (
    ClassificationFamily,
    LeastSquaresFamily,
    LogisticRegressionFamily,
    Task,
    TaskFamily,
)
from metamd_jax.transform import ScaleByMirrorDescentState, metamd, scale_by_mirror_descent

__version__ = '0.1.0'

__all__ = (
    'AdaptiveRollout',
    'ClassificationFamily',
    'DiagonalMetric',
    'EigenbasisState',
    'FitResult',
    'GuardedState',
    'KroneckerAxes',
    'KroneckerMetric',
    'LeastSquaresFamily',
    'LogisticRegressionFamily',
    'MetaGradient',
    'MetaTrainState',
    'RestartState',
    'Rollout',
    'ScalarMetric',
    'ScaleByAdaptiveMirrorDescentState',
    'ScaleByBlendedMirrorDescentState',
    'ScaleByLowRankMirrorDescentState',
    'ScaleByMirrorDescentState',
    'Task',
    'TaskFamily',
    'accelerated_metamd',
    'adaptive_metamd',
    'adaptive_regret_bound',
    'adaptive_rollout',
    'blended_metamd',
    'bregman_divergence',
    'calibrate',
    'calibrated_metamd',
    'check_divergence',
    'check_structure',
    'convergence_bound',
    'doubling_restarts',
    'low_rank_metamd',
    'eigenbasis_levels',
    'eigenbasis_metamd',
    'fit',
    'guarded_switch',
    'init_divergence',
    'load_calibration',
    'load_divergence',
    'load_optimizer',
    'meta_gradient',
    'metamd',
    'mirror_step',
    'nesterov_momentum',
    'reference_gradient_norm',
    'regret_bound',
    'rollout',
    'save_calibration',
    'save_divergence',
    'scale_by_adaptive_mirror_descent',
    'scale_by_blended_mirror_descent',
    'scale_by_eigenbasis_mirror_descent',
    'scale_by_low_rank_mirror_descent',
    'scale_by_mirror_descent',
    'statistics_prior',
    'strong_convexity',
    'unrolled_loss',
)
