"""The benchmark scripts: the shared timing module, the pieces of each script, and each
script's whole ``main`` on tiny settings."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FAST_COMPILE

import metamd_jax
from experiments import builders, evaluate
from metamd_jax import artifact, evaluation, models, statistics
from metamd_jax.objectives import MetaGradient
from scripts import (
  benchmark_meta_gradient,
  benchmark_parallel,
  benchmark_roots,
  benchmark_step,
  timing,
  trace_guard,
  trace_overshoot,
)
from scripts.inputs import init_params

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
class FakeClock:
  """A clock that only moves when a fake body says it took time."""

  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def _fake_bodies(clock, costs, log, calls_per_round=None):
  """Bodies whose calls take ``cost * load`` fake seconds, ``load = 1 + round``.

  The load stands for machine noise that drifts between rounds; ``round`` is counted from
  all calls, ``calls_per_round`` of them per round (default: one per body).
  """
  calls_per_round = calls_per_round or len(costs)

  def make(name, cost):
    def fn():
      load = 1 + len(log) // calls_per_round
      log.append(name)
      clock.now += cost * load
      return name

    return timing.Timed(fn, (), clock=clock)

  return {name: make(name, cost) for name, cost in costs.items()}


def test_round_robin_rotates_the_first_body_and_runs_each_once_per_round():
  log = []
  bodies = _fake_bodies(FakeClock(), {'a': 1.0, 'b': 1.0, 'c': 1.0}, log)
  for body in bodies.values():
    body.repeats = 4
  timing.round_robin(bodies)
  assert log == list('abc' 'bca' 'cab' 'abc')
  assert [len(body.samples) for body in bodies.values()] == [4, 4, 4]


def test_round_robin_stops_a_body_at_its_repeats():
  log = []
  bodies = _fake_bodies(FakeClock(), {'slow': 1.0, 'fast': 1.0}, log)
  bodies['slow'].repeats, bodies['fast'].repeats = 2, 4
  timing.round_robin(bodies)
  assert log == ['slow', 'fast', 'fast', 'slow', 'fast', 'fast']
  assert len(bodies['slow'].samples) == 2 and len(bodies['fast'].samples) == 4


def test_interleaved_medians_and_paired_ratio_cancel_a_drifting_load():
  clock = FakeClock()
  bodies = _fake_bodies(clock, {'metamd': 3e-3, 'sgd': 1e-3}, [])
  for body in bodies.values():
    body.repeats = 5
  timing.round_robin(bodies)
  metamd, sgd = bodies['metamd'], bodies['sgd']
  # Round r runs at load 1 + r for both bodies.
  np.testing.assert_allclose(metamd.samples, 3e-3 * np.arange(1, 6))
  assert metamd.median == pytest.approx(9e-3)
  assert metamd.quartiles == pytest.approx((6e-3, 12e-3))
  assert metamd.median / sgd.median == pytest.approx(3.0)
  assert timing.paired_ratio(metamd, sgd) == pytest.approx(3.0)
  summary = metamd.summary()
  assert summary['median_ms'] == pytest.approx(9.0)
  assert summary['min_ms'] == pytest.approx(3.0)
  assert (summary['repeats'], summary['calls_per_sample']) == (5, 1)


def test_calibrate_skips_the_compiling_call_and_batches_short_calls():
  clock = FakeClock()
  call_s = 2.0 ** -13  # About 0.12 ms, exact in binary like every sum below.
  costs = iter([4.0] + [call_s] * 100)  # The first call compiles.

  def fn(x):
    clock.now += next(costs)
    return x + 1

  body = timing.Timed(fn, (0,), feedback=lambda out: (out,), clock=clock)
  fastest = body.calibrate(warm_up=3, repeats=7, min_sample_s=2.0 ** -10)
  assert fastest == call_s
  assert body.number == 8 and body.repeats == 7 and body.samples == []
  assert body.run() == call_s  # Seconds per call, over 8 calls.
  assert body.args == (11,) and body.last == 11  # Outputs fed back to the next call.


@pytest.mark.parametrize('repeats, max_total_s, expected', [
    (10, 5.0, 3), (10, 11.0, 5), (10, 100.0, 10), (2, 5.0, 2)])
def test_calibrate_caps_the_samples_of_a_slow_body(repeats, max_total_s, expected):
  clock = FakeClock()

  def fn():
    clock.now += 2.0

  body = timing.Timed(fn, (), clock=clock)
  body.calibrate(warm_up=1, repeats=repeats, min_repeats=3, max_total_s=max_total_s)
  assert body.number == 1 and body.repeats == expected


def test_each_sample_waits_for_the_outputs(monkeypatch):
  synced = []
  monkeypatch.setattr(timing.jax, 'block_until_ready', lambda out: synced.append(out) or out)
  body = timing.Timed(jax.jit(lambda x: x * 2), (jnp.ones(3),))
  body.number = 4
  body.run()
  assert len(synced) == 1 and synced[0] is body.last
  np.testing.assert_array_equal(body.last, 2 * np.ones(3))


def test_environment_report():
  env = timing.environment()
  assert env['jax'] == jax.__version__ and env['numpy'] == np.__version__
  assert env['num_devices'] == jax.device_count() and env['cpu_count'] >= 1
  text = timing.describe_environment(env)
  assert f"jax {jax.__version__}" in text and 'BLAS threads' in text
  assert env['blas_threads'] in text and 'XLA_FLAGS=' in text


def test_limit_blas_threads():
  # threadpoolctl comes with scikit-learn, an install requirement: a missing one fails here.
  import threadpoolctl  # noqa: F401
  limiter = timing.limit_blas_threads(1)
  try:
    pools = timing.blas_threads().split(', ')
    assert pools and all(pool.endswith(': 1') for pool in pools), pools
  finally:
    limiter.restore_original_limits()
  assert timing.limit_blas_threads(0) is None


class _Analysed:
  """Stands for ``jax.jit(f)``: ``lower(...).compile().cost_analysis()`` returns ``analysis``."""

  def __init__(self, analysis):
    self.analysis = analysis

  def lower(self, *args):
    return self

  def compile(self):
    return self

  def cost_analysis(self):
    return self.analysis


@pytest.mark.parametrize('analysis, expected', [
    ({'flops': 12.0, 'bytes accessed': 3.0}, 12.0),
    ([{'flops': 7.0}], 7.0),  # Older JAX: one dict per computation.
    (None, None),  # No cost model on this backend.
    ({}, None),
    ([], None),
])
def test_xla_flops_reads_every_form_of_cost_analysis(analysis, expected):
  assert benchmark_step.xla_flops(_Analysed(analysis)) == expected


def test_xla_flops_of_a_matmul():
  flops = benchmark_step.xla_flops(jax.jit(jnp.dot), jnp.ones((4, 5)), jnp.ones((5, 6)))
  assert flops == pytest.approx(2 * 4 * 5 * 6)


def test_update_flop_count_matches_xla_on_the_same_products():
  model = models.MLP(hidden_sizes=(8,), num_classes=benchmark_step.NUM_CLASSES)
  params = init_params(model, (16,))
  state = benchmark_step.make_optimiser('metamd', params).init(params)
  products, elementwise = benchmark_step.update_products(state)
  # Every leaf, as an (m, n) matrix (a bias as (m, 1)), gets dense factors P (m, m) and
  # Q (n, n): the products P @ G and (P G) @ Q take 2 m m n and 2 m n n FLOPs.
  matrices = [(16, 8), (8, 1), (8, 10), (10, 1)]
  expected = sorted(f for m, n in matrices for f in (2.0 * m * m * n, 2.0 * m * n * n))
  assert sorted(p['flops'] for p in products) == expected
  assert elementwise >= sum(x.size for x in jax.tree.leaves(params))  # The learning rate.
  plain, operands = benchmark_step.plain_products(state)
  # XLA counts a product with a contraction of length 1 (a bias's Q) as m n multiplies.
  assert benchmark_step.xla_flops(plain, operands) == pytest.approx(sum(expected), rel=0.01)


def test_meta_gradient_batches_wrap_around_the_data():
  batch_size = 7
  x_ext, y_ext = benchmark_meta_gradient.load_data('digits', batch_size)
  num_examples = x_ext.shape[0] - batch_size
  np.testing.assert_array_equal(x_ext[num_examples:], x_ext[:batch_size])
  np.testing.assert_array_equal(y_ext[num_examples:], y_ext[:batch_size])
  task = benchmark_meta_gradient.make_task(None, (x_ext, y_ext, {}), batch_size)
  step = num_examples // batch_size  # The batch that runs past the end.
  start = step * batch_size
  x, y = task.batch(jnp.asarray(step))
  np.testing.assert_array_equal(x, x_ext[start:start + batch_size])
  np.testing.assert_array_equal(y[-1], y_ext[(start + batch_size - 1) % num_examples])


def test_memory_stats_of_a_compiled_function():
  x = jnp.ones((32, 32), jnp.float32)
  compiled = jax.jit(lambda x: x @ x + 1).lower(x).compile()
  memory = benchmark_meta_gradient.memory_stats(compiled)
  assert memory['argument'] == x.nbytes and memory['output'] == x.nbytes
  assert memory['total'] == memory['argument'] + memory['output'] + memory['temp'] - memory[
      'alias']


def _horizon_result(num_steps, implicit_temp, implicit_over_rollout):
  """The fields of one horizon's result that ``targets`` reads."""
  return {'T': num_steps, 'implicit_over_rollout': implicit_over_rollout,
          'implicit_over_rollout_paired': implicit_over_rollout,
          'implicit_over_rollout_min': implicit_over_rollout,
          'functions': {'implicit': {'memory': {'temp': implicit_temp, 'total': 2000}},
                        'unrolled': {'memory': {'temp': 50 * implicit_temp, 'total': 0}}}}


@pytest.mark.parametrize('temp_high, ratio_high, memory_met, time_met', [
    (1100, 1.2, True, True), (1300, 1.2, False, True), (1000, 2.0, True, False)])
def test_meta_gradient_targets(temp_high, ratio_high, memory_met, time_met):
  results = [_horizon_result(10, 1000, 1.1), _horizon_result(1000, temp_high, ratio_high)]
  checks = benchmark_meta_gradient.targets(results)
  assert checks['memory']['T_low'] == 10 and checks['memory']['T_high'] == 1000
  assert checks['memory']['temp_ratio'] == pytest.approx(temp_high / 1000)
  assert checks['memory']['met'] == memory_met
  assert [t['met'] for t in checks['time']] == [True, time_met]
  assert benchmark_meta_gradient.targets(results[:1])['memory'] is None  # Needs two T.


def test_parallel_loads_a_config_file():
  config = benchmark_parallel.load_config(str(CONFIGS / 'tiny.py'))
  assert config.meta.meta_batch_size == 2 and config.task.hidden_sizes == (8,)


def test_parallel_refuses_more_devices_than_jax_has(monkeypatch, capsys):
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)  # main adds the fake device count to it.
  too_many = jax.device_count() + 1  # JAX has started: the flag can no longer add devices.
  with pytest.raises(SystemExit):
    benchmark_parallel.main(['--devices', '1', str(too_many)])
  assert f'asks for {too_many} devices but JAX has {too_many - 1}' in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Each script's main on tiny settings (the --quick defaults take minutes on 2 cores).
# ---------------------------------------------------------------------------


def test_benchmark_step_main(tmp_path, capsys, monkeypatch):
  tiny = (models.MLP(hidden_sizes=(8,), num_classes=benchmark_step.NUM_CLASSES), (16,))
  monkeypatch.setattr(benchmark_step, 'make_model', lambda name, args: tiny)
  path = tmp_path / 'step.json'
  benchmark_step.main(['--quick', '--models', 'mlp', '--batch-sizes', '4', '--repeats', '2',
                       '--update-repeats', '2', '--min-sample-ms', '0', '--json', str(path)])
  out = capsys.readouterr().out
  assert '## MetaMD step benchmark' in out and '| mlp | 4 |' in out
  assert 'Reference matmuls' in out and f'wrote {path}' in out
  figures = json.loads(path.read_text())
  step = figures['steps'][0]
  for name in benchmark_step.OPTIMISERS:
    assert step[name]['median_ms'] > 0 and step[name]['repeats'] == 2
    assert np.isfinite(step[name]['final_loss'])
  # Adaptive and blended MetaMD against MetaMD: a ratio per variant, and their table.
  variants = ('adaptive_metamd', 'blended_metamd', 'blended_kron_metamd',
              'blended_nesterov_metamd')
  assert set(variants) <= set(benchmark_step.OPTIMISERS)
  assert step['over_metamd']['metamd'] == {'median': 1.0, 'paired': 1.0}
  for name in variants:
    np.testing.assert_allclose(step['over_metamd'][name]['median'],
                               step[name]['median_ms'] / step['metamd']['median_ms'])
  assert ('| adaptive ms | blended ms | blended (Shampoo) ms | blended (Nesterov) ms '
          '| adaptive/MetaMD | blended/MetaMD |') in out
  update = figures['updates']['models']['mlp']
  assert set(update['variants']) == set(benchmark_step.UPDATE_VARIANTS)
  # The analytic count is the matmuls XLA counts for the same products in plain jnp.
  assert update['xla_flops_plain'] == pytest.approx(update['matmul_flops'], rel=0.05)


def test_benchmark_meta_gradient_main(tmp_path, capsys):
  path = tmp_path / 'meta_gradient.json'
  benchmark_meta_gradient.main([
      '--quick', '--horizons', '2', '--hidden', '8', '--batch', '16', '--repeats', '2',
      '--warm-up', '1', '--min-sample-ms', '0', '--json', str(path)])
  out = capsys.readouterr().out
  assert '## Meta-gradient benchmark' in out and '- implicit/rollout time at T=2' in out
  figures = json.loads(path.read_text())
  [result] = figures['results']
  assert result['T'] == 2
  assert set(result['functions']) == set(benchmark_meta_gradient.FUNCTIONS)
  for function in result['functions'].values():
    assert function['finite'] and function['median_ms'] > 0 and function['repeats'] == 2
    assert function['memory']['temp'] > 0


def test_benchmark_parallel_main(monkeypatch, capsys, tmp_path):
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)  # main adds the fake device count to it.
  path = tmp_path / 'parallel.json'
  # --horizon 0 and --meta-batch-size 0: the config's own.
  benchmark_parallel.main(['--quick', '--config', str(CONFIGS / 'tiny.py'), '--devices', '1',
                           '--meta-batch-size', '0', '--horizon', '0', '--repeats', '1',
                           '--json', str(path)])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith('| 1 |')]
  assert len(rows) == 1, out
  cells = [cell.strip() for cell in rows[0].strip('|').split('|')]
  assert cells[1] == '2' and float(cells[3]) > 0  # 2 tasks on the device; meta-steps / s.
  figures = json.loads(path.read_text())
  tiny = benchmark_parallel.load_config(str(CONFIGS / 'tiny.py'))
  assert (figures['horizon'], figures['meta_batch_size']) == (tiny.meta.horizon,
                                                              tiny.meta.meta_batch_size)
  assert figures['devices']['1']['tasks_per_device'] == tiny.meta.meta_batch_size == 2
  assert figures['devices']['1']['median_ms'] > 0 and figures['devices']['1']['repeats'] == 1


def test_roots_benchmark_swaps_the_refresh_eigh_and_times_each_implementation(tmp_path):
  matrix = benchmark_roots.spd(6)
  original = statistics._eigh  # noqa: SLF001
  expected = np.linalg.eigvalsh(np.asarray(matrix, np.float64))
  with benchmark_roots.refresh_eigh(benchmark_roots.IMPLEMENTATIONS['qr']):
    assert statistics._eigh is not original  # noqa: SLF001
    values, vectors = statistics._eigh(matrix)  # noqa: SLF001
    np.testing.assert_allclose(values, expected, rtol=1e-4)
    np.testing.assert_allclose(vectors @ jnp.diag(values) @ vectors.T, matrix, atol=1e-4)
  assert statistics._eigh is original  # noqa: SLF001
  figures = benchmark_roots.main(['--sizes', '6', '--repeats', '2', '--out-dir', str(tmp_path)])
  eigh = figures['eigh']
  assert eigh['6/default']['median_ms'] > 0 and eigh['6/default'][
      'max_relative_value_deviation'] == 0.0
  assert eigh['6/qr']['max_relative_value_deviation'] < 1e-5
  # The CPU lowers no Jacobi eigendecomposition: recorded, not fatal.
  assert 'error' in eigh['6/jacobi'] or eigh['6/jacobi']['median_ms'] > 0
  assert json.loads((tmp_path / 'roots.json').read_text())['eigh'].keys() == eigh.keys()
  for bad in (['--sizes', '0'], ['--sizes', 'ten'], ['--repeats', '0']):
    with pytest.raises(SystemExit):
      benchmark_roots.main(bad)


def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
  env = {**os.environ, 'PATH': f'{pathlib.Path(sys.executable).parent}:{os.environ["PATH"]}',
         'JAX_PLATFORMS': 'cpu'}
  root = CONFIGS.parent
  done = subprocess.run(['bash', str(root / 'scripts' / 'gpu_check.sh'), str(tmp_path)],
                        cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stdout + done.stderr
  assert 'setup failed: no GPU backend' in done.stdout
  log = (tmp_path / 'gpu_check.log').read_text()
  assert 'AssertionError' in log  # the backend check, after every import succeeded
  assert not list(tmp_path.glob('*.json'))  # nothing ran


# ---------------------------------------------------------------------------
# The transformer language model (tiny sizes: the defaults compile for minutes).
# ---------------------------------------------------------------------------

TINY_TRANSFORMER = ['--context', '8', '--width', '16', '--depth', '1', '--heads', '2']


def test_step_optimisers_of_each_model():
  assert benchmark_step.optimisers_of('mlp') == (benchmark_step.OPTIMISERS, 'adam')
  names, reference = benchmark_step.optimisers_of('transformer')
  assert names == ('metamd', 'adaptive_metamd', 'adamw', 'muon') and reference == 'adamw'
  # A subset keeps AdamW, the reference of every ratio.
  assert benchmark_step.optimisers_of('transformer', ('muon',)) == (('adamw', 'muon'), 'adamw')


def test_step_transformer_batch_is_byte_windows_and_their_next_bytes():
  x, y = benchmark_step.make_batch('transformer', (8,), 3)
  assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == jnp.int32
  assert int(x.min()) >= 0 and int(y.max()) < benchmark_step.VOCAB_SIZE
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize('flag', [['--models', 'rnn'], ['--optimisers', 'lion']])
def test_benchmark_step_refuses_unknown_names(flag, capsys):
  with pytest.raises(SystemExit):
    benchmark_step.main(flag)
  assert 'unknown' in capsys.readouterr().err


def test_benchmark_step_main_transformer(tmp_path, capsys):
  path = tmp_path / 'step.json'
  benchmark_step.main(['--models', 'transformer', *TINY_TRANSFORMER, '--windows', '2',
                       '--optimisers', 'metamd', '--repeats', '2', '--steps-only',
                       '--json', str(path)])
  out = capsys.readouterr().out
  assert '### Transformer LM training step' in out and 'TransformerLM context 8, width 16' in out
  assert '| transformer | 2 (16) | MetaMD |' in out and '| transformer | 2 (16) | AdamW |' in out
  assert 'MetaMD update alone' not in out  # --steps-only.
  figures = json.loads(path.read_text())
  assert figures['updates'] is None
  [step] = figures['steps']
  assert step['model'] == 'transformer' and step['tokens'] == 16 and step['num_params'] > 0
  assert step['optimisers'] == ['metamd', 'adamw'] and step['reference'] == 'adamw'
  for name in step['optimisers']:
    assert np.isfinite(step[name]['median_ms']) and step[name]['median_ms'] > 0
    assert step[name]['repeats'] == 2 and np.isfinite(step[name]['final_loss'])
    assert step[name]['xla_gflop'] is None or step[name]['xla_gflop'] > 0
  assert step['over_reference']['adamw'] == {'median': 1.0, 'paired': 1.0}
  for ratio in (step['over_reference']['metamd']['median'],
                step['over_reference']['metamd']['paired'], step['metamd_over_adamw']):
    assert np.isfinite(ratio) and ratio > 0


class _FakeObjectives:
  """Stands for ``objectives``: records the keyword arguments of ``meta_gradient``."""

  def __init__(self):
    self.calls = []

  def meta_gradient(self, divergence, task, num_steps, **kwargs):
    self.calls.append(kwargs)
    return MetaGradient(0.0, {}, jnp.zeros(num_steps), 0.0)


def test_meta_gradient_functions_name_their_adjoints(monkeypatch):
  fake = _FakeObjectives()
  monkeypatch.setattr(benchmark_meta_gradient, 'objectives', fake)
  functions = benchmark_meta_gradient.make_functions(lambda data: None, 3)
  for name in ('implicit', 'statistics', 'unrolled'):
    functions[name](None, None)
  implicit, statistics, unrolled = fake.calls
  # The library default (adjoint='auto') is the statistics adjoint: 'implicit' must be named.
  assert implicit == {'objective': 'bound', 'adjoint': 'implicit'}
  assert statistics == {'objective': 'bound', 'adjoint': 'statistics'}
  assert unrolled == {'objective': 'unrolled'}
  only = benchmark_meta_gradient.make_functions(lambda data: None, 3,
                                                benchmark_meta_gradient.TRANSFORMER_FUNCTIONS)
  assert tuple(only) == ('rollout', 'statistics', 'implicit')


@pytest.mark.heavy
def test_benchmark_meta_gradient_main_transformer(tmp_path, capsys):
  path = tmp_path / 'meta_gradient.json'
  benchmark_meta_gradient.main([
      '--model', 'transformer', *TINY_TRANSFORMER, '--batch', '2', '--horizons', '2',
      '--repeats', '2', '--warm-up', '1', '--min-sample-ms', '0', '--json', str(path)])
  out = capsys.readouterr().out
  assert 'TransformerLM context 8, width 16, depth 1, 2 heads' in out
  assert "adjoint='auto' resolves to 'statistics'" in out
  assert '- implicit/rollout time at T=2' in out and '- statistics/rollout time at T=2' in out
  figures = json.loads(path.read_text())
  assert figures['setup']['model'] == 'transformer' and figures['setup']['batch'] == 2
  [result] = figures['results']
  assert result['T'] == 2
  assert list(result['functions']) == list(benchmark_meta_gradient.TRANSFORMER_FUNCTIONS)
  for function in result['functions'].values():
    assert function['finite'] and function['median_ms'] > 0 and function['repeats'] == 2
    assert np.isfinite(function['median_ms']) and function['memory']['temp'] > 0
  for name in ('implicit', 'statistics'):
    for suffix in ('', '_paired', '_min'):
      ratio = result[f'{name}_over_rollout{suffix}']
      assert np.isfinite(ratio) and ratio > 0
  # Both adjoints give the same bound on the same task.
  values = [result['functions'][name]['value'] for name in ('rollout', 'statistics', 'implicit')]
  assert values == pytest.approx([values[0]] * 3, rel=1e-4)


@pytest.mark.heavy
def test_trace_overshoot_main(tmp_path, capsys):
  """The trace equals a plain loop of the config's adaptive optimiser on the same
  validation task: the whole-set losses every 2 steps and the check's final factors;
  the factors start at 1, never decrease and stop at the cap set on the command line."""
  config = benchmark_parallel.load_config(str(CONFIGS / 'tiny.py'))
  config.meta.init_learning_rate = 1.0  # long learned steps: the check shortens them
  family, _ = builders.build_families(config)
  divergence = builders.build_divergence(config, family)
  artifact.save_divergence(tmp_path / 'divergence.npz', divergence)
  result = trace_overshoot.main(['--config', str(CONFIGS / 'tiny.py'), '--workdir',
                                 str(tmp_path), '--steps', '8', '--every', '2', '--task', '1',
                                 '--set', 'adaptive_overshoot_cap=1.5', '--json',
                                 str(tmp_path / 'trace.json')])
  # tiny's config with the same learned divergence (its start is meta.init_learning_rate).
  assert result['steps'] == [0, 2, 4, 6, 8] and result['settings']['overshoot_cap'] == 1.5
  sigma = np.asarray(result['sigma'])
  assert sigma.shape == (5, len(result['layers'])) and np.all(sigma[0] == 1)
  assert np.all(np.diff(sigma, axis=0) >= 0) and np.all(sigma <= 1.5 * (1 + 1e-6))
  assert sigma[-1].max() > 1  # the check acted
  assert json.loads((tmp_path / 'trace.json').read_text())['sigma'] == result['sigma']
  assert '| step | train loss | sigma' in capsys.readouterr().out

  config.eval.adaptive_overshoot_cap = 1.5
  tune = evaluation.tuning_tasks(family, config.seed, config.eval.num_tune_tasks)
  optimizer = evaluate.adaptive_optimizer(
      config, divergence, evaluate.calibrate(config, divergence, family, tune))
  tasks = evaluation.tuning_tasks(family, config.seed, 2)
  task = family.task(jax.tree.map(lambda x: x[1], tasks))
  curves = evaluation.run(optimizer, family, jax.tree.map(lambda x: x[1:], tasks), 8,
                          track_every=2)
  np.testing.assert_allclose(result['train_loss'], curves.train_losses[0], rtol=1e-5)
  params = task.init()
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)  # one compiled step, not each operation on its own
  for step in range(8):
    grads = jax.grad(task.loss)(params, task.batch(jnp.int32(step)))
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(sigma[-1], trace_overshoot._overshoot_state(state).scale,
                             rtol=1e-5)


@pytest.mark.parametrize('argv, message', [
    (['--set', 'no_such_field=1'], 'FIELD=VALUE'),
    (['--set', 'adaptive_overshoot_cap=big'], 'adaptive_overshoot_cap'),
    (['--set', 'shifts=inputs_x2'], 'only number, bool and string'),
    (['--steps', '5', '--every', '2'], 'multiple'),
    (['--shift', 'upside_down'], '--shift'),
    (['--set', 'adaptive_overshoot=false'], 'no check'),
])
def test_trace_overshoot_names_bad_arguments(tmp_path, argv, message):
  with pytest.raises(SystemExit, match=message):
    trace_overshoot.main(['--config', str(CONFIGS / 'tiny.py'), '--workdir', str(tmp_path),
                          *argv])


def test_trace_overshoot_names_a_missing_divergence(tmp_path):
  with pytest.raises(FileNotFoundError, match='divergence.npz'):
    trace_overshoot.main(['--config', str(CONFIGS / 'tiny.py'), '--workdir', str(tmp_path)])


@pytest.mark.heavy
@pytest.mark.parametrize('shift', [None, 'inputs_x2'])
def test_trace_guard_main(tmp_path, capsys, monkeypatch, shift):
  """Per task: the switch where the step count says, the loss before it the fast step's,
  the highest loss after it and the steps to Adam's loss those of plain runs
  (``evaluation.run`` of the guarded optimiser, frozen MetaMD and Adam), on the tasks
  under ``--shift`` where given."""
  config = benchmark_parallel.load_config(str(CONFIGS / 'tiny.py'))
  family, _ = builders.build_families(config)
  divergence = builders.build_divergence(config, family)
  artifact.save_divergence(tmp_path / 'divergence.npz', divergence)
  calibrations = []  # the script's own calibration, reused below
  calibrate = evaluate.calibrate
  monkeypatch.setattr(evaluate, 'calibrate',
                      lambda *args: calibrations.append(calibrate(*args)) or calibrations[-1])
  result = trace_guard.main(['--config', str(CONFIGS / 'tiny.py'), '--workdir', str(tmp_path),
                             '--num-tasks', '2', '--steps', '10', '--margin', '1e30',
                             '--switch-after', '3', '--adam-lr', '0.1',
                             '--json', str(tmp_path / 'trace.json')]
                            + ([] if shift is None else ['--shift', shift]))
  assert '| task | switch | loss before' in capsys.readouterr().out
  assert json.loads((tmp_path / 'trace.json').read_text()) == result
  assert result['settings']['switch_after'] == 3 and len(result['tasks']) == 2
  assert result['settings']['shift'] == shift
  if shift is not None:
    family = builders.shifted_family(config, family, shift, 'meta_train')

  config.eval.adaptive_guard_margin, config.eval.adaptive_guard_steps = 1e30, 3
  assert len(calibrations) == 1
  guarded = evaluate.adaptive_optimizer(config, divergence, calibrations[0])
  tasks = evaluation.tuning_tasks(family, config.seed, 2)
  curves = {name: np.asarray(evaluation.run(optimizer, family, tasks, 10,
                                            track_every=1).train_losses)
            for name, optimizer in (('guarded', guarded), ('adam', optax.adam(0.1)),
                                    ('fast', metamd_jax.metamd(divergence)))}
  for index, row in enumerate(result['tasks']):
    fast = curves['fast'][index]
    assert row['switch'] == 4
    np.testing.assert_allclose(row['target'], curves['adam'][index, -1], rtol=1e-6)
    np.testing.assert_allclose(row['loss_before'], fast[3], rtol=1e-5)
    np.testing.assert_allclose(row['highest_after'], np.max(curves['guarded'][index, 4:9]),
                               rtol=1e-5)
    for key, curve in (('guarded_steps', curves['guarded'][index]), ('fast_steps', fast)):
      below = [t for t in range(1, 11) if curve[t] <= row['target']]
      assert row[key] == (below[0] if below else None)


@pytest.mark.parametrize('argv, message', [
    (['--adam-lr', '0.1'], 'no guard'),
    (['--adam-lr', '0.1', '--margin', '2', '--tasks', 'test'], '--tasks'),
    (['--adam-lr', '0', '--margin', '2'], '--adam-lr'),
    (['--adam-lr', '0.1', '--margin', '-1'], 'adaptive_guard_margin'),
    (['--adam-lr', '0.1', '--margin', '2', '--set', 'no_such_field=none'], 'FIELD=VALUE'),
    (['--adam-lr', '0.1', '--margin', '2', '--shift', 'inputs_x3'], '--shift'),
])
def test_trace_guard_names_bad_arguments(tmp_path, argv, message):
  with pytest.raises(SystemExit, match=message):
    trace_guard.main(['--config', str(CONFIGS / 'tiny.py'), '--workdir', str(tmp_path),
                      *argv])


def _stored_check(entries, reference='adam'):
  """A stored check: the baseline at its tuned rate trains, its re-tuned form reaches its
  loss in 10 steps; ``entries``: ``{name: (above_initial_loss, steps, loss)}``."""
  optimizers = {reference: {'diverged': 0},
                f'{reference}_retuned': {'diverged': 0, 'final_train_loss': [1.0, 0.0],
                                         f'steps_to_{reference}_retuned_final_loss': [10, 0.0],
                                         'reached_fraction': 1.0}}
  for name, (above, steps, loss) in entries.items():
    optimizers[name] = {'diverged': 0, 'above_initial_loss': above,
                        'final_train_loss': [loss, 0.0],
                        f'steps_to_{reference}_retuned_final_loss': [steps, 0.0],
                        'reached_fraction': 1.0}
  return {'reference': f'{reference}_retuned', 'optimizers': optimizers}


def test_rescore_choices_applies_the_current_rule_to_stored_results(tmp_path, capsys):
  from experiments import choose_variant
  from scripts import rescore_choices
  # Stored before runs above their start counted: 'a' (lower loss, 2 runs above its
  # start) was chosen; the current rule takes 'b'.
  checks = {'x': _stored_check({'a': (2, 5, 0.5), 'b': (0, 8, 0.6)})}
  old = {n: {k: v for k, v in choose_variant.score(checks, n, 'adam').items()
             if k not in ('above_initial_runs', 'failed_runs')} for n in 'ab'}
  stored = {'reference': 'adam', 'checks': checks, 'scores': old,
            'chosen': choose_variant.choose(old)}
  assert stored['chosen'] == 'a'
  result = rescore_choices.rescore(stored)
  assert (result['stored'], result['chosen']) == ('a', 'b')
  assert result['scores']['a']['failed_runs'] == 2
  # A robustness sweep judged against AdamW: its rows' checks name the baseline.
  rows = {value: {'checks': {'x': _stored_check({'config': (above, 5, 0.5)}, 'adamw')},
                  'robustness': {'num_checks': 1}}
          for value, above in (('0.1', 1), ('0.3', 0))}
  sweep = {'criterion': 'robustness', 'reference': 'adam', 'chosen': '0.1', 'rows': rows}
  result = rescore_choices.rescore(sweep)
  assert result['chosen'] == '0.3' and result['scores']['0.1']['failed_runs'] == 1
  paths = [tmp_path / 'cv.json', tmp_path / 'sweep.json']
  for path, value in zip(paths, (stored, sweep)):
    path.write_text(json.dumps(value))
  rescore_choices.main([str(p) for p in paths])
  out = capsys.readouterr().out
  assert '| cv.json | a | b | a: 2 | yes |' in out and '2 of 2 choices differ' in out
  assert '| sweep.json | 0.1 | 0.3 | 0.1: 1 | no |' in out  # its stored rows hold no figures
  # A stored check in seconds judged again against a third of the reference's time.
  seconds = {'optimizers': {'a': {'reached_fraction': 1.0, 'faster': True,
                                  'elapsed_fraction_of_reference_T_seconds': 0.4},
                            'b': {'reached_fraction': 1.0, 'faster': True,
                                  'elapsed_fraction_of_reference_T_seconds': 0.2}}}
  timed = dict(stored, **{choose_variant.SECONDS: seconds})
  assert [rescore_choices.rescore(timed)['scores'][n]['num_faster'] for n in 'ab'] == [2, 2]
  third = rescore_choices.rescore(timed, seconds_fraction=1 / 3)['scores']
  assert [third[n]['num_faster'] for n in 'ab'] == [1, 2]
  with pytest.raises(SystemExit, match='--seconds-fraction must be in'):
    rescore_choices.main(['--seconds-fraction', '0', str(paths[0])])
  (tmp_path / 'other.json').write_text('{"chosen": "a"}')
  with pytest.raises(SystemExit, match='other.json: not a choose_variant result'):
    rescore_choices.main([str(tmp_path / 'other.json')])
  with pytest.raises(SystemExit, match='missing.json: no such file'):
    rescore_choices.main([str(tmp_path / 'missing.json')])


def test_text_regions_measures_each_region_alone(capsys):
  import zlib

  from metamd_jax import text
  from scripts import text_regions
  rows = text_regions.region_rows('python_docs', [0, 4096], chunk=4096)
  regions = text.split_text(text.load_text('python_docs'), 4096)
  data = bytes(regions['heldout'].tokens)
  expected = 8 * sum(len(zlib.compress(data[i:i + 4096], 9))
                     for i in range(0, len(data), 4096)) / len(data)
  assert rows[1]['heldout'] == (len(data), pytest.approx(expected))
  assert sum(rows[0][r][0] for r in text_regions.REGIONS) == len(text.load_text('python_docs'))
  text_regions.main(['--texts', 'python_docs', '--block-sizes', '0,4096'])
  out = capsys.readouterr().out
  assert out.count('| python_docs |') == 2
  with pytest.raises(SystemExit, match='--block-sizes must be integers'):
    text_regions.main(['--block-sizes', 'a'])
  with pytest.raises(SystemExit, match='block_size must be an integer >= 0'):
    text_regions.main(['--texts', 'python_docs', '--block-sizes', '-5'])
