"""Convex least squares with a shared Kronecker-structured curvature (condition 100).

The setting of the convergence guarantee: the learned divergence should approach the
shared Hessian ``S (x) C``.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.task.family = 'least_squares'
  config.task.input_dim = 16
  config.task.output_dim = 8
  config.task.num_samples = 512
  config.task.batch_size = 64
  config.task.condition = 100.0
  config.meta.init_learning_rate = 0.01
  config.meta.horizon = 50
  config.meta.num_meta_steps = 200
  config.eval.learning_rates = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
  # Meta learning rate 0.1 collapsed meta-training on this family (experiments/RESULTS.md).
  config.meta.learning_rate = 0.03
  # The floor, chosen on validation tasks over 1e-4, 1e-3, 0.01 and 0.1 by the rule of
  # experiments.choose_variant, judged also at 10 times the horizon (experiments/RESULTS.md
  # section 20): 0.01. Every value passes both checks and the four geometric means of the
  # final losses agree to 1e-5: the learned factors' smallest eigenvalues (about 1.1) lie
  # above all four floors (1e-3 before, not swept).
  #   python -m experiments.sweep --config configs/least_squares.py --field=meta.eps \
  #       --values=0.0001,0.001,0.01,0.1 --rule=robustness --config.eval.horizon_multiplier=10
  config.meta.eps = 0.01
  # Longer first steps where a leaf's first gradient is far below its level: chosen for
  # the MNIST MLP only (experiments/RESULTS.md section 36); not judged on this family.
  config.eval.adaptive_lengthen_below = None
  config.eval.frozen_rank = None  # the MNIST MLP's low-rank row (not judged here)
  # No cap on the overshoot check (the default has 3): on the validation tasks, judged also
  # at 10 times the horizon, 2 of 2 checks against 1 of 2 with the cap 3 (10T lost) and a
  # lower final loss than the cap 10 (experiments/RESULTS.md section 19).
  config.eval.adaptive_overshoot_cap = float('inf')
  # No doubling restarts (the default has them): on the validation tasks, judged also at 10
  # times the horizon, 2 of 2 checks either way and a lower final loss at 10T without them,
  # 0.1584 against 0.1709 (re-tuned Adam 0.1606): on these noisy convex tasks the lengthened
  # steps raise the loss the run settles at (experiments/RESULTS.md section 21).
  config.eval.adaptive_restarts = False
  return config
