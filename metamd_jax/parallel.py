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
from typing import Any

import jax
import numpy as np

PyTree = Any
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


def pmap_meta_step(meta_step: Callable, devices: Sequence) -> Callable:
  """``pmap`` a meta-step built with ``axis_name=AXIS_NAME`` over ``devices``.

  The returned function takes the replicated state and this process's task slice
  (``(devices, per-device, ...)``) and returns the replicated new state and metrics.
  """
  return jax.pmap(meta_step, axis_name=AXIS_NAME, devices=list(devices))


class MetaStepRunner:
  """Runs a device-agnostic meta-step on one device (``jit``) or sharded (``pmap``).

  Args:
    build_meta_step: ``axis_name -> meta_step`` (e.g. a partial of
      :func:`metamd_jax.meta_train.make_meta_step`); ``axis_name`` is ``None`` on one
      device and :data:`AXIS_NAME` when sharded.
    meta_batch_size: the global meta-batch (checked to divide over all devices).
    num_devices: local devices to use (0: all).
  """

  def __init__(self, build_meta_step: Callable[[str | None], Callable], meta_batch_size: int,
               num_devices: int = 0):
    self.devices = local_devices(num_devices)
    self.sharded = len(self.devices) > 1 or jax.process_count() > 1
    self.tasks_per_device = tasks_per_device(meta_batch_size, len(self.devices))
    if self.sharded:
      # In a multi-process job pmap maps over every process's local devices.
      devices = self.devices if jax.process_count() == 1 else None
      self._step = jax.pmap(build_meta_step(AXIS_NAME), axis_name=AXIS_NAME, devices=devices)
      # Places stacked host copies exactly as pmap returns its outputs, so the step
      # compiles once whether it gets a fresh or a returned state.
      self._place = jax.pmap(lambda tree: tree, axis_name=AXIS_NAME, devices=devices)
    else:
      self._step = jax.jit(build_meta_step(None))

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
