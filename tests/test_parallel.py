"""Task sharding over fake CPU devices and processes against the single-device run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE

from metamd_jax import parallel

SCRIPT = pathlib.Path(__file__).parent / 'multidevice_run.py'


def _run(output, *args, devices_per_process=4, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=(f'--xla_force_host_platform_device_count={devices_per_process} '
                        f'{FAST_COMPILE}'))
  return subprocess.Popen([sys.executable, str(SCRIPT), str(output), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process, timeout=240):
  try:
    _, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()
    raise
  assert process.returncode == 0, stderr.decode()[-3000:]


def _compare(a, b, rtol):
  for x, y in zip(a, b):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max())


def _check_four_devices_equal_one(results, rtol):
  assert results['device_count'] == 4
  for name in ('gradient', 'three_steps', 'fit'):
    _compare(results['4'][name], results['1'][name], rtol)
  np.testing.assert_allclose(results['4']['fit_meta_loss'], results['1']['fit_meta_loss'],
                             rtol=rtol)
  # The trainer runs the same meta-steps as the runner driven by hand.
  _compare(results['4']['fit'], results['4']['three_steps'], rtol)
  assert results['4']['three_steps_traces'] == 1  # no recompilation across meta-steps
  assert np.max(np.abs(np.asarray(results['1']['gradient'][0]))) > 0


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.heavy
def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  # In float64, so that equality holds to 1e-12 whatever the order of the reductions
  # (float32 runs the same code; sharded float32 meta-training is the kill/resume test's).
  # The reference process also checks four local devices against one.
  single = tmp_path / 'single.json'
  multi = tmp_path / 'multi.json'
  reference = _run(single, '--x64', '--devices', '1', '4')
  port = str(_free_port())
  workers = [_run(multi, '--x64', '--devices', '0', '--processes', '2', '--process-id', str(i),
                  '--port', port, devices_per_process=2) for i in range(2)]
  try:
    for process in [reference, *workers]:
      _finish(process, timeout=240)
  finally:
    for process in workers:
      if process.poll() is None:
        process.kill()
  a, b = json.loads(multi.read_text()), json.loads(single.read_text())
  _check_four_devices_equal_one(b, 1e-12)  # four local devices against one, in float64
  assert a['process_count'] == 2 and a['device_count'] == 4
  for name in ('gradient', 'three_steps', 'fit'):
    _compare(a['0'][name], b['4'][name], 1e-12)


def test_uneven_meta_batch_is_rejected_with_the_field_name():
  with pytest.raises(ValueError, match=r'meta_batch_size = 6 does not divide evenly over 4'):
    parallel.tasks_per_device(6, 4)
  assert parallel.tasks_per_device(8, 4) == 2


def test_process_slice_and_replication_shapes():
  tasks = {'x': np.arange(12).reshape(6, 2)}
  sliced = parallel.process_slice(tasks, 3)
  assert sliced['x'].shape == (3, 2, 2)
  np.testing.assert_array_equal(sliced['x'].reshape(6, 2), tasks['x'])
  replicated = parallel.replicate({'a': np.ones(3)}, jax.local_devices() * 2)
  assert replicated['a'].shape == (2, 3)
  np.testing.assert_array_equal(parallel.unreplicate(replicated)['a'], np.ones(3))


def test_collectives_are_identities_without_pmap():
  tree = {'a': np.ones(2)}
  assert parallel.psum_if_pmap(tree, None) is tree
  assert parallel.pmean_if_pmap(tree, None) is tree
  with pytest.raises(ValueError, match='devices'):
    parallel.local_devices(len(jax.local_devices()) + 1)
