"""All device mapping lives here: task sharding with ``pmap`` and multi-host helpers.

Per-task maths (tasks, objectives, the meta-step) is written once and is device-agnostic:
it calls :func:`psum_if_pmap` / :func:`pmean_if_pmap` with an ``axis_name`` that is
``None`` on a single device. This module shards a meta-batch of tasks over the local
devices (``vmap`` within a device), replicates the meta-parameters and meta-optimiser
state, and, in a multi-process job (``jax.distributed``), gives each process its own
disjoint slice of the global meta-batch; the collectives then span every process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from metamd_jax.types import PyTree

AXIS_NAME = 'tasks'


def psum_if_pmap(tree: PyTree, axis_name: str | None) -> PyTree:
  """``lax.psum`` over ``axis_name`` inside ``pmap``; the identity when it is ``None``."""
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, axis_name)


def pmean_if_pmap(tree: PyTree, axis_name: str | None) -> PyTree:
  """``lax.pmean`` over ``axis_name`` inside ``pmap``; the identity when it is ``None``."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def local_devices(num_devices: int = 0) -> list:
  """The first ``num_devices`` local devices (all of them for 0)."""
  devices = jax.local_devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f'asked for {num_devices} devices but this process has {len(devices)} '
                     f'({devices[0].platform}).')
  return devices[:num_devices] if num_devices else devices


def tasks_per_device(meta_batch_size: int, num_local_devices: int) -> int:
  """Tasks each device runs; the global meta-batch must divide evenly over all devices."""
  total = num_local_devices * jax.process_count()
  if meta_batch_size % total:
    raise ValueError(
        f'config.meta.meta_batch_size = {meta_batch_size} does not divide evenly over '
        f'{total} devices ({jax.process_count()} processes x {num_local_devices} local); '
        'use a multiple of the device count.')
  return meta_batch_size // total


def process_slice(task_params: PyTree, num_local_devices: int) -> PyTree:
  """This process's disjoint slice of the global meta-batch, shaped (devices, per-device).

  Every process samples the same global meta-batch (from the same key) and keeps rows
  ``[process_index * local, (process_index + 1) * local)``.
  """
  leaves = jax.tree.leaves(task_params)
  total = leaves[0].shape[0]
  per_device = tasks_per_device(total, num_local_devices)
  local = per_device * num_local_devices
  start = jax.process_index() * local

  def take(x):
    x = np.asarray(x)[start:start + local]
    return x.reshape((num_local_devices, per_device) + x.shape[1:])

  return jax.tree.map(take, task_params)


def replicate(tree: PyTree, devices: Sequence) -> PyTree:
  """Stack one copy of ``tree`` per device (a leading device axis), the input ``pmap``
  shards over the devices."""
  return jax.tree.map(lambda x: np.stack([np.asarray(x)] * len(devices)), tree)


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of a replicated tree, as host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def is_writer() -> bool:
  """Whether this process writes logs, metrics and artifacts (process 0 of the job).

  Every process runs the same program; only the writer touches shared files (orbax
  checkpoints coordinate their own writes).
  """
  return jax.process_index() == 0


def describe() -> str:
  """The devices and processes of this job, for a log line."""
  return (f'{jax.local_device_count()} local of {jax.device_count()} devices '
          f'({jax.devices()[0].platform}), process {jax.process_index()} of '
          f'{jax.process_count()}')


class MetaStepRunner:
  """Runs a device-agnostic meta-step on one device (``jit``) or sharded (``pmap``).

  The runner decides the placement first; the meta-step is then built for it, with
  ``axis_name=runner.axis_name`` (``None`` on one device, :data:`AXIS_NAME` when the
  meta-batch is sharded over several devices or processes), and handed to
  :meth:`compile`::

    runner = MetaStepRunner(meta_batch_size=8)
    runner.compile(make_meta_step(family, optimizer, num_steps=T,
                                  axis_name=runner.axis_name))
    state = runner.to_devices(state)
    state, metrics = runner.step(state, task_params)

  Args:
    meta_batch_size: the global meta-batch (checked to divide over all devices).
    num_devices: local devices to use (0: all).
  """

  def __init__(self, meta_batch_size: int, num_devices: int = 0):
    self.devices = local_devices(num_devices)
    self.sharded = len(self.devices) > 1 or jax.process_count() > 1
    self.tasks_per_device = tasks_per_device(meta_batch_size, len(self.devices))
    self.axis_name = AXIS_NAME if self.sharded else None
    self._step = None
    self._place = None
    if self.sharded:
      # In a multi-process job pmap maps over every process's local devices.
      self._pmap_devices = self.devices if jax.process_count() == 1 else None
      # Places stacked host copies exactly as pmap returns its outputs, so the step
      # compiles once whether it gets a fresh or a returned state.
      self._place = jax.pmap(lambda tree: tree, axis_name=AXIS_NAME,
                             devices=self._pmap_devices)

  def compile(self, meta_step: Callable[[PyTree, PyTree], tuple[PyTree, dict]]) -> None:
    """Use ``meta_step(state, task_params) -> (state, metrics)``, built with
    ``axis_name=self.axis_name``: ``pmap`` it when sharded, ``jit`` it otherwise."""
    if self.sharded:
      self._step = jax.pmap(meta_step, axis_name=AXIS_NAME, devices=self._pmap_devices)
    else:
      self._step = jax.jit(meta_step)

  def to_devices(self, state: PyTree) -> PyTree:
    """Place a host state for :meth:`step` (replicated when sharded)."""
    return self._place(replicate(state, self.devices)) if self.sharded else state

  def to_host(self, state: PyTree) -> PyTree:
    """The single copy of a state returned by :meth:`step` (for checkpoints, artifacts)."""
    return unreplicate(state) if self.sharded else state

  def step(self, state: PyTree, task_params: PyTree) -> tuple[PyTree, dict]:
    """One meta-step on the global meta-batch ``task_params`` (this process takes its slice).

    Returns:
      The new (device) state and the metrics as host scalars.
    """
    if self._step is None:
      raise RuntimeError('MetaStepRunner.step called before compile(meta_step).')
    if self.sharded:
      state, metrics = self._step(state, process_slice(task_params, len(self.devices)))
      metrics = jax.tree.map(lambda x: x[0], metrics)
    else:
      state, metrics = self._step(state, task_params)
    return state, {k: float(np.asarray(v)) for k, v in metrics.items()}


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Start the multi-process runtime (once, before any other JAX call).

  With no arguments JAX detects the cluster itself (TPU pods, SLURM, Open MPI); on CPU
  the collectives use gloo. Afterwards every process runs the same program: each takes its
  slice of the meta-batch and process 0 writes logs, checkpoints and artifacts.
  """
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except (AttributeError, ValueError):  # older or newer JAX without this option
    pass
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
