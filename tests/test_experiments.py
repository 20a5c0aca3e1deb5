"""The whole pipeline on a tiny config: launches, artifacts, validation, kill and resume."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import FAST_COMPILE
from helpers import KILL_AT_META_STEP

import metamd_jax
from configs import tiny
from experiments import builders, evaluate, meta_train
from metamd_jax import evaluation

ROOT = pathlib.Path(__file__).resolve().parents[1]


# The launcher, killing itself at meta-step KILL_AT_META_STEP (tests/helpers.py).
_KILLED_LAUNCH = KILL_AT_META_STEP + """
import runpy
runpy.run_module('experiments.main', run_name='__main__', alter_sys=True)
"""


def _launch(workdir, *overrides, mode='meta_train', devices=1, kill_at=None):
  entry = ['-m', 'experiments.main'] if kill_at is None else ['-c', _KILLED_LAUNCH]
  command = [sys.executable, *entry, '--config', 'configs/tiny.py',
             '--workdir', str(workdir), '--mode', mode, *overrides]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}')
  if kill_at is not None:
    env['KILL_AT_META_STEP'] = str(kill_at)
  return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env)


@pytest.mark.heavy
def test_tiny_pipeline_writes_every_output(tmp_path, capsys):
  config = tiny.get_config()
  result = meta_train.meta_train(config, tmp_path, progress=False)
  divergence = result.divergence
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert all(np.isfinite(r['meta_loss']) for r in records)
  assert records == result.history  # the log is the trainer's history, record for record
  loaded, metadata = metamd_jax.load_divergence(tmp_path / meta_train.ARTIFACT)
  for a, b in zip(jax.tree.leaves(loaded),
                  jax.tree.leaves(divergence)):
    np.testing.assert_array_equal(a, b)
  assert metadata['config']['meta']['horizon'] == config.meta.horizon
  config.eval.baselines = ('adam',)  # every tuned baseline is the same code path
  results = evaluate.evaluate(config, tmp_path)
  # The default config's low-rank row too (rank 64: the tiny MLP's factors are kept whole).
  assert set(results['optimizers']) == {'metamd', 'metamd_adaptive', 'metamd_low_rank', 'adam'}
  np.testing.assert_allclose(results['optimizers']['metamd_low_rank']['final_train_loss'],
                             results['optimizers']['metamd']['final_train_loss'], rtol=1e-5)
  assert results['optimizers']['adam']['learning_rate'] in config.eval.learning_rates
  for name in ('results.json', 'results.md', 'loss_curves.png'):
    assert (tmp_path / name).stat().st_size > 0
  assert (tmp_path / 'loss_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # The workdir's learned optimiser, loaded as a user would (the job prints how), is the
  # adaptive row it reports: the same whole-set losses on the held-out tasks.
  assert f'metamd_jax.load_optimizer({str(tmp_path)!r})' in capsys.readouterr().out
  written = json.loads((tmp_path / 'results.json').read_text())
  assert written['adaptive']['divergence_digest'] == (
      metamd_jax.calibrated.divergence_digest(loaded))
  _, meta_test_family = builders.build_families(config)
  ev = config.eval
  rerun = evaluation.run(metamd_jax.load_optimizer(tmp_path), meta_test_family,
                         evaluation.held_out_tasks(meta_test_family, config.seed, ev.num_tasks),
                         ev.num_steps, track_every=ev.track_every)
  np.testing.assert_allclose(evaluation.curve_stats(rerun.train_losses)[0],
                             written['optimizers']['metamd_adaptive']['mean_curve'], rtol=1e-5)


def test_select_writes_the_best_or_the_last_divergence(tmp_path):
  config = tiny.get_config()
  config.meta.select = 'best'
  best = meta_train.meta_train(config, tmp_path / 'best', progress=False)
  # The same run, kept the other way: a finished run resumes from its last checkpoint
  # with nothing left to do and keeps the last meta-iterate instead.
  shutil.copytree(tmp_path / 'best' / 'checkpoints', tmp_path / 'last' / 'checkpoints')
  config.meta.select = 'last'
  last = meta_train.meta_train(config, tmp_path / 'last', progress=False)
  assert last.resumed_from == config.meta.num_meta_steps and last.history == best.history
  for a, b in zip(jax.tree.leaves(last.state), jax.tree.leaves(best.state)):
    np.testing.assert_array_equal(a, b)
  state = best.state
  assert int(state.step) == config.meta.num_meta_steps
  assert np.isfinite(float(state.best_score)) and float(state.best_score) <= float(state.score)
  for name, result, expected in (('last', last, state.divergence),
                                 ('best', best, state.best_divergence)):
    saved, _ = metamd_jax.load_divergence(tmp_path / name / meta_train.ARTIFACT)
    for a, b, c in zip(jax.tree.leaves(saved), jax.tree.leaves(result.divergence),
                       jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(b, c)


def test_a_workdir_resumes_only_its_own_run_and_a_log_cut_short(tmp_path):
  """Resuming a workdir with another meta-training setting is named before any meta-step;
  an evaluation setting, the data's folder or more meta-steps are not. A metrics line cut
  short by a kill is dropped; a damaged earlier one is named. A workdir whose checkpoints
  are gone but whose artifact is there is not overwritten."""
  config = tiny.get_config()
  config.meta.num_meta_steps = 1
  meta_train.meta_train(config, tmp_path, progress=False)
  log = tmp_path / meta_train.METRICS
  changed = config.copy_and_resolve_references()
  changed.meta.learning_rate = 0.5
  with pytest.raises(ValueError, match=r'run_info\.meta\.learning_rate: 0\.1 then, 0\.5 now'):
    meta_train.meta_train(changed, tmp_path, progress=False)
  assert len(log.read_text().splitlines()) == 1
  log.write_text(log.read_text() + '{"step": 2, "meta_lo')  # a kill mid-write
  config.meta.num_meta_steps = 2
  config.eval.num_tasks = 3
  config.task.data_dir = str(tmp_path)
  result = meta_train.meta_train(config, tmp_path, progress=False)
  assert result.resumed_from == 1
  assert [json.loads(line) for line in log.read_text().splitlines()] == result.history
  log.write_text('{"step": 1\n' + log.read_text())  # damaged before the last line
  config.meta.num_meta_steps = 3
  with pytest.raises(ValueError, match=f'{re.escape(str(log))} line 1 is not a metric record'):
    meta_train.meta_train(config, tmp_path, progress=False)
  shutil.rmtree(tmp_path / 'checkpoints')
  with pytest.raises(ValueError, match='holds the divergence.npz of a run whose checkpoints'):
    meta_train.meta_train(config, tmp_path, progress=False)


def test_an_empty_workdir_is_refused_at_start(tmp_path):
  process = _launch('', mode='meta_train')
  _, stderr = process.communicate(timeout=120)
  assert process.returncode != 0 and b'--workdir is empty' in stderr
  assert not (ROOT / meta_train.METRICS).exists() and not (ROOT / 'checkpoints').exists()


@pytest.mark.parametrize('field,value', [
    ('task.family', 'vision'),
    ('task.dataset', 'imagenet'),
    ('meta.horizon', -1),
    ('meta.meta_batch_size', 0),
    ('meta.solver', 'lu'),
    ('meta.objective', 'validation'),
    ('meta.learning_rate', 0.0),
    ('meta.select', 'first'),
    ('meta.score_decay', 1.0),
    ('eval.baselines', ('sgd', 'lion')),
    ('eval.adaptive_overshoot_scope', 'online'),
    ('task.hidden_sizes', (0,)),
    ('task.hidden_sizes', (8, -1)),
])
def test_bad_config_values_name_the_field(field, value):
  config = tiny.get_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=rf'config\.{field}'):
    builders.validate_config(config)


# One inadmissible value per run-time setting of the adaptive optimiser.
_BAD_SETTINGS = {
    'decay': 1.0, 'per_leaf': 1, 'eigenbasis': 'yes', 'eigenbasis_rank': -1,
    'blend_rate': -0.1, 'blend_statistics': 'bogus', 'momentum': -1.0, 'online_power': 1.5,
    'max_dimension': 0, 'block_size': -1, 'sketch_rank': -3, 'sketch_interval': 2.0,
    'lengthen_below': 0.0, 'min_scale': 1.5, 'overshoot': None, 'overshoot_decay': 1.0,
    'refresh_growth': -0.1, 'overshoot_cap': 0.5, 'overshoot_scope': 'online',
    'restarts': 0, 'restart_growth': float('inf'), 'restart_shrink': -1.0,
    'restart_momentum': 1.0, 'restart_step_factor': -1.0, 'guard_margin': 0.0,
    'guard_steps': -1, 'guard_progress': -0.5, 'guard_prior': 'no', 'frozen_rank': 0,
    'frozen_rank_fill': 'median',
}


@pytest.mark.parametrize('name', sorted(_BAD_SETTINGS))
def test_a_run_time_setting_is_checked_alike_in_a_config_and_in_a_record(name):
  """A config's eval field and a calibration record's setting follow one rule
  (``metamd_jax.calibrated.SETTING_RULES``): the same bad value is named by both."""
  assert set(_BAD_SETTINGS) == set(metamd_jax.calibrated.SETTING_RULES)
  bad = _BAD_SETTINGS[name]
  field = builders.CALIBRATION_FIELDS[name]
  config = ml_collections.ConfigDict(tiny.get_config().to_dict(), type_safe=False)
  builders.validate_config(config)
  config.eval[field] = bad
  got = re.escape(repr(bad))
  with pytest.raises(ValueError, match=rf'config\.eval\.{field} must .*, got {got}'):
    builders.validate_config(config)
  record = {**metamd_jax.calibrated.RECOMMENDED, 'reference_norm': [1.0],
            'eigenbasis_levels': [[[1.0], [1.0]]], 'num_steps': 10}
  metamd_jax.calibrated.check_calibration(record)
  with pytest.raises(ValueError, match=rf"calibration's {name} must .*, got {got}"):
    metamd_jax.calibrated.check_calibration({**record, name: bad})


@pytest.mark.parametrize('model,sizes', [('cnn', (8, 0)), ('cnn', ('8',)), ('resnet', ()),
                                         ('mlp', 'wide'), ('mlp', (True,))])
def test_bad_model_sizes_are_named(model, sizes):
  """Before: a zero width divided by zero in the model's initialisation, a negative one
  failed in XLA's shape checks."""
  config = ml_collections.ConfigDict(tiny.get_config().to_dict(), type_safe=False)
  config.task.model = model
  config.task['hidden_sizes' if model == 'mlp' else 'channels'] = sizes
  with pytest.raises(ValueError, match=r'config\.task\.(hidden_sizes|channels) must be a tuple '
                                       'of positive ints'):
    builders.validate_config(config)
  config.task['hidden_sizes' if model == 'mlp' else 'channels'] = (4,)
  builders.validate_config(config)


def test_command_line_rejects_a_bad_value_at_start(tmp_path):
  process = _launch(tmp_path / 'run', '--config.meta.horizon=-3')
  _, stderr = process.communicate(timeout=120)
  assert process.returncode != 0
  assert b'config.meta.horizon must be an integer >= 1' in stderr
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()


@pytest.mark.heavy
def test_resume_after_sigkill_redoes_the_same_meta_steps(tmp_path):
  """A real ``kill -9`` mid-run of the main job, with tasks sharded over two devices.

  The resumed run redoes the meta-steps after its last checkpoint; each must log exactly
  what the killed run logged for it (the restored state, keys and batches are the same).
  The whole resumed run against an uninterrupted one, divergence bit for bit: the README's
  meta-training example (tests/test_readme.py); four devices and two processes against
  one: tests/test_parallel.py.
  """
  devices = 2
  total, kill_at = 8, 5  # checkpoints at 2 and 4: step 5 at least is redone
  overrides = (f'--config.meta.num_meta_steps={total}', '--config.meta.checkpoint_every=2',
               f'--config.meta.meta_batch_size={2 * devices}')
  workdir = tmp_path / 'killed'
  process = _launch(workdir, *overrides, devices=devices, kill_at=kill_at)
  _, stderr = process.communicate(timeout=400)
  assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
  assert not (workdir / meta_train.ARTIFACT).exists()
  killed = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in killed] == list(range(1, kill_at + 1))
  checkpoints = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert checkpoints and max(checkpoints) < kill_at

  resumed = _launch(workdir, *overrides, devices=devices)
  _, stderr = resumed.communicate(timeout=400)
  assert resumed.returncode == 0, stderr.decode()[-2000:]
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == list(range(1, total + 1))
  drop = lambda rs: [{k: v for k, v in r.items() if k != 'seconds'} for r in rs]  # noqa: E731
  # Every step the killed run logged, the redone ones (after the last checkpoint) included,
  # is logged the same.
  assert drop(records[:kill_at]) == drop(killed)
  # Resumed, not restarted: a restart would log step 1 again (with its own seconds).
  assert records[0]['seconds'] == killed[0]['seconds']
  assert all(np.isfinite(r['meta_loss']) for r in records)
  divergence, _ = metamd_jax.load_divergence(workdir / meta_train.ARTIFACT)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(divergence))


@pytest.mark.parametrize('name', ['default', 'tiny', 'digits_mlp', 'mnist1d_cnn', 'class_split',
                                  'least_squares', 'transformer_lm'])
def test_shipped_configs_validate_and_build(name):
  import importlib

  config = importlib.import_module(f'configs.{name}').get_config()
  builders.validate_config(config)
  meta_train_family, meta_test_family = builders.build_families(config)
  divergence = builders.build_divergence(config, meta_train_family)
  params = meta_test_family.init_params()
  metamd_jax.artifact.check_compatible(divergence, params)
  # The structure without running init_params: every family's shapes and dtypes.
  for family in (meta_train_family, meta_test_family):
    assert family.param_shapes() == jax.eval_shape(lambda: params)
  if name == 'class_split':
    assert meta_train_family is not meta_test_family
    assert meta_train_family.num_classes == meta_test_family.num_classes == 5


def test_text_block_size_cuts_the_language_model_regions_from_interleaved_blocks():
  from configs import transformer_lm
  from metamd_jax import text

  config = transformer_lm.get_config()
  assert config.task.text_block_size == 4096  # the config's, since RESULTS.md section 27
  builders.validate_config(config)
  meta_train_family, meta_test_family = builders.build_families(config)
  regions = text.split_text(text.load_text(config.task.text), 4096)
  for family, region in ((meta_train_family, 'train'), (meta_test_family, 'heldout')):
    np.testing.assert_array_equal(np.asarray(family.train.tokens), regions[region].tokens)
    np.testing.assert_array_equal(np.asarray(family.test.tokens), regions['test'].tokens)
  config.task.text_block_size = 0  # contiguous: the regions of split_text's default
  np.testing.assert_array_equal(
      np.asarray(builders.build_families(config)[1].train.tokens),
      text.split_text(text.load_text(config.task.text))['heldout'].tokens)
  config.task.text_block_size = -1
  with pytest.raises(ValueError, match='task.text_block_size must be an integer >= 0'):
    builders.validate_config(config)


def test_user_file_config_without_files_names_the_field():
  from configs import cifar10_resnet

  config = cifar10_resnet.get_config()
  builders.validate_config(config)
  with pytest.raises(ValueError, match='data_dir'):
    builders.build_families(config)
