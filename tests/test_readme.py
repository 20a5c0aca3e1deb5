"""The README's examples run as written."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import optax
import pytest
from helpers import KILL_AT_META_STEP, well_conditioned

import metamd_jax
from metamd_jax import evaluation, meta_train

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _example(marker: str) -> str:
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
  return next(b for b in blocks if marker in b)


def test_readme_optax_example_runs():
  namespace = {}
  exec(compile(_example('metamd_jax.metamd(divergence)'), str(README), 'exec'),  # noqa: S102
       namespace)
  jax, optax = namespace['jax'], namespace['optax']
  # The example's divergence is SGD(0.1): its step equals optax's clipped SGD step.
  initial = namespace['model'].init(jax.random.key(0), namespace['x'])['params']
  reference = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
  updates, _ = reference.update(jax.grad(namespace['loss_fn'])(initial),
                                reference.init(initial), initial)
  expected = optax.apply_updates(initial, updates)
  for a, b in zip(jax.tree.leaves(namespace['params']), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_readme_load_optimizer_example_runs(tmp_path, monkeypatch):
  """The README's training step with a workdir's learned optimiser: ``load_optimizer``
  reads a workdir (written here: a divergence and a calibration record), and the jitted
  steps match the record's optimiser stepped by hand."""
  params = {'dense': {'kernel': 0.1 * jax.random.normal(jax.random.key(0), (6, 3)),
                      'bias': jax.numpy.zeros(3)}}
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.1), seed=2, noise=0.2)
  record = {'reference_norm': [0.05, 0.05], 'decay': 0.9, 'per_leaf': True,
            'blend_rate': 0.1, 'blend_statistics': 'kronecker', 'momentum': 0.5,
            'restarts': True, 'num_steps': 3,
            'divergence_digest': metamd_jax.calibrated.divergence_digest(divergence)}
  workdir = tmp_path / 'runs' / 'default'
  workdir.mkdir(parents=True)
  metamd_jax.save_divergence(workdir / 'divergence.npz', divergence, params)
  (workdir / 'results.json').write_text(json.dumps({'adaptive': record}))
  monkeypatch.chdir(tmp_path)
  x = jax.random.normal(jax.random.key(1), (16, 6))
  y = x @ jax.random.normal(jax.random.key(2), (6, 3))

  def loss_fn(p, batch):
    inputs, targets = batch
    return jax.numpy.mean((inputs @ p['dense']['kernel'] + p['dense']['bias'] - targets) ** 2)

  namespace = {'loss_fn': loss_fn}
  exec(compile(_example("load_optimizer('runs/default')"), str(README), 'exec'),  # noqa: S102
       namespace)
  optimizer, train_step = namespace['optimizer'], namespace['train_step']
  by_hand = metamd_jax.calibrated_metamd(divergence, record)
  ours, state = params, optimizer.init(params)
  theirs, hand_state = params, by_hand.init(params)
  for step in range(7):  # past two restarts
    batch = (x[2 * step:2 * step + 8], y[2 * step:2 * step + 8])
    ours, state = train_step(ours, state, batch)
    updates, hand_state = by_hand.update(jax.grad(loss_fn)(theirs, batch), hand_state, theirs)
    theirs = optax.apply_updates(theirs, updates)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f'step {step}')
  assert loss_fn(ours, (x, y)) < loss_fn(params, (x, y))


def test_readme_calibration_example_runs(tmp_path, monkeypatch):
  """The README's calibration of a family's divergence from Python: the record holds the
  divergence's levels on the family's tuning tasks, and the optimiser loaded from the
  workdir trains held-out tasks as the record's optimiser in memory does."""
  namespace = {'__name__': 'readme_family'}
  family_code = _example('meta_train.fit(').split('family = Regression()')[0]
  exec(compile(family_code, str(README), 'exec'), namespace)  # noqa: S102
  family = namespace['Regression']()
  params = family.init_params()
  divergence = metamd_jax.init_divergence(params, 0.02)  # fit's start: it trains the tasks
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'runs' / 'regression').mkdir(parents=True)  # fit's workdir
  metamd_jax.save_divergence('runs/regression/divergence.npz', divergence, params)
  namespace.update(family=family, result=types.SimpleNamespace(divergence=divergence))
  exec(compile(_example('metamd_jax.calibrate('), str(README), 'exec'),  # noqa: S102
       namespace)
  calibration = namespace['calibration']
  tasks = evaluation.tuning_tasks(family, 0, 3)
  assert calibration['reference_norm'] == metamd_jax.reference_gradient_norm(
      divergence, family, tasks, 20, per_leaf=True)
  assert calibration['num_steps'] == 20 and calibration['num_calibration_tasks'] == 3
  assert (tmp_path / 'runs' / 'regression' / 'calibration.json').is_file()
  held_out = evaluation.held_out_tasks(family, 0, 2)
  ours = evaluation.run(namespace['optimizer'], family, held_out, 30).losses
  theirs = evaluation.run(metamd_jax.calibrated_metamd(divergence, calibration), family,
                          held_out, 30).losses
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert np.all(ours[:, -1] < 0.5 * ours[:, 0])


# Runs the README's meta-training example in a fresh process (which kills itself at
# meta-step KILL_AT_META_STEP when that is set, tests/helpers.py) and records its history.
_RUNNER = KILL_AT_META_STEP + """
import json, sys

namespace = {'__name__': '__main__'}
exec(compile(open(sys.argv[1]).read(), 'README.md', 'exec'), namespace)
result = namespace['result']
with open('history.json', 'w') as f:
  json.dump({'history': result.history, 'resumed_from': result.resumed_from}, f)
"""


def _run_example(workdir: pathlib.Path, example: pathlib.Path, kill_at: int | None = None):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'runner.py').write_text(_RUNNER)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if kill_at is not None:
    env['KILL_AT_META_STEP'] = str(kill_at)
  return subprocess.Popen([sys.executable, 'runner.py', str(example)],
                          cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process, timeout=300):
  _, stderr = process.communicate(timeout=timeout)
  return process.returncode, stderr.decode()[-3000:]


@pytest.mark.heavy
def test_readme_meta_training_example_resumes_after_sigkill(tmp_path):
  example = tmp_path / 'example.py'
  example.write_text(_example('meta_train.fit('))
  killed, clean = tmp_path / 'killed', tmp_path / 'clean'
  code, stderr = _finish(_run_example(killed, example, kill_at=25))
  assert code == -signal.SIGKILL, stderr
  run_dir = killed / 'runs' / 'regression'
  assert not (run_dir / 'divergence.npz').exists()
  # Checkpoints are written asynchronously: the one of step 20 may not have been complete.
  last = max(int(p.name) for p in (run_dir / 'checkpoints').iterdir() if p.name.isdigit())
  assert last in (10, 20)

  resumed, uninterrupted = _run_example(killed, example), _run_example(clean, example)
  for process in (resumed, uninterrupted):
    code, stderr = _finish(process)
    assert code == 0, stderr
  a = json.loads((killed / 'history.json').read_text())
  b = json.loads((clean / 'history.json').read_text())
  assert a['resumed_from'] == last and b['resumed_from'] is None
  drop = lambda h: [{k: v for k, v in r.items() if k != 'seconds'} for r in h]  # noqa: E731
  assert drop(a['history']) == drop(b['history']) and len(a['history']) == 60
  learned, _ = metamd_jax.load_divergence(run_dir / 'divergence.npz')
  reference, _ = metamd_jax.load_divergence(clean / 'runs' / 'regression' / 'divergence.npz')
  for x, y in zip(jax.tree.leaves(learned), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # The learned divergence trains held-out tasks of the family faster than its start.
  namespace = {'__name__': 'readme_family'}
  family_code = example.read_text().split('family = Regression()')[0]
  exec(compile(family_code, 'README.md', 'exec'), namespace)  # noqa: S102
  family = namespace['Regression']()
  tasks = meta_train.sample_tasks(family, jax.random.key(123), 0, 4)
  start = metamd_jax.init_divergence(family.init_params(), learning_rate=0.02)
  final = {name: evaluation.run(opt, family, tasks, 20).losses[:, -5:].mean()
           for name, opt in (('learned', metamd_jax.metamd(learned)),
                             ('start', optax.sgd(0.02)),
                             ('start_divergence', metamd_jax.metamd(start)))}
  np.testing.assert_allclose(final['start_divergence'], final['start'], rtol=1e-5)
  assert final['learned'] < 0.8 * final['start'], final


def test_public_api_covers_what_the_readme_uses():
  text = README.read_text()
  used = set(re.findall(r'metamd_jax\.([A-Za-z_]\w*)', text))
  modules = {'meta_train', 'evaluation', 'tasks', 'parallel', 'artifact', 'divergence',
             'models', 'text', 'calibrated'}
  missing = sorted(n for n in used - modules if n not in metamd_jax.__all__)
  assert not missing, f'README uses metamd_jax.{missing} outside __all__'
  used_from_meta_train = set(re.findall(r'meta_train\.([A-Za-z_]\w*)', text))
  assert {'fit', 'make_meta_step', 'sample_tasks', 'init_state'} <= used_from_meta_train
  for name in used_from_meta_train - {'py'}:
    assert hasattr(meta_train, name), name
  for name in metamd_jax.__all__:
    assert not name.startswith('_') and getattr(metamd_jax, name) is not None
  assert {'fit', 'FitResult', 'MetaTrainState', 'TaskFamily', 'Task',
          'ClassificationFamily', 'LeastSquaresFamily'} <= set(metamd_jax.__all__)
