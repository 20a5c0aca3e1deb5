"""Benchmark scripts (not tests), run from the repository root as modules::

  python -m scripts.benchmark_step --quick
  python -m scripts.benchmark_meta_gradient --quick
  python -m scripts.benchmark_parallel --quick

:mod:`scripts.timing` holds what they share about measuring (interleaved rounds, warm-up,
medians, the environment report); :mod:`scripts.inputs` the benchmarked parameters and
divergence.
"""
