"""Meta-steps per second against the number of (fake CPU) devices the tasks are sharded over.

A sanity check of the sharding overhead, not of speed-up: fake CPU devices share the same
cores. Run on a machine with accelerators to measure real scaling. One meta-step runner per
device count, all timed in interleaved rounds (``scripts.timing``); each figure is the
median over the rounds.

Usage (from the repository root)::

  python -m scripts.benchmark_parallel --devices 1 2 4 --config configs/digits_mlp.py
  python -m scripts.benchmark_parallel --quick      # smoke run: 2 rounds, horizon 5
  python -m scripts.benchmark_parallel --devices 1 --config configs/default.py \
      --horizon 0 --meta-batch-size 0 --json out.json   # the config's own horizon and batch
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os

import jax
import ml_collections

from experiments import builders
from metamd_jax import meta_train, parallel
from scripts import timing


def load_config(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file at ``path``."""
  spec = importlib.util.spec_from_file_location('config_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def use_fake_cpu_devices(count: int) -> None:
  """Ask XLA for ``count`` host devices; effective only before JAX starts its backends."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={count}')


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: horizon 5 and 2 rounds unless given')
  parser.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4])
  parser.add_argument('--config', default='configs/digits_mlp.py')
  parser.add_argument('--meta-batch-size', type=int, default=8,
                      help="tasks per meta-step (0: the config's)")
  parser.add_argument('--horizon', type=int, default=None,
                      help="inner steps per task (default 20, 5 with --quick; 0: the config's)")
  parser.add_argument('--json', default=None, help='also write the figures here')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed rounds (default 5, 2 with --quick)')
  args = parser.parse_args(argv)
  if args.horizon is None:
    args.horizon = 5 if args.quick else 20
  if args.repeats is None:
    args.repeats = 2 if args.quick else 5
  device_counts = list(dict.fromkeys(args.devices))
  use_fake_cpu_devices(max(device_counts))
  if jax.device_count() < max(device_counts):
    parser.error(f'--devices asks for {max(device_counts)} devices but JAX has '
                 f'{jax.device_count()} ({jax.default_backend()}; fake CPU devices must be '
                 'set before JAX starts).')

  config = load_config(args.config)
  if args.horizon < 0 or args.meta_batch_size < 0:
    parser.error('--horizon and --meta-batch-size must be >= 0 (0: the config\'s).')
  args.horizon = args.horizon or config.meta.horizon
  args.meta_batch_size = args.meta_batch_size or config.meta.meta_batch_size
  config.meta.horizon = args.horizon
  config.meta.meta_batch_size = args.meta_batch_size
  family, _ = builders.build_families(config)
  optimizer = builders.build_meta_optimizer(config)
  divergence = builders.build_divergence(config, family)
  key = jax.random.key(0)
  # The tasks of the warm-up step and of each round, sampled before any timing.
  tasks = [meta_train.sample_tasks(family, key, step, args.meta_batch_size)
           for step in range(args.repeats + 1)]

  env = timing.environment()
  print(timing.describe_environment(env))
  print(f'config {args.config}, meta-batch {args.meta_batch_size}, horizon {args.horizon}, '
        f'{args.repeats} rounds, device counts interleaved round-robin')
  bodies, runners = {}, {}
  for num_devices in device_counts:
    runner = parallel.MetaStepRunner(args.meta_batch_size, num_devices)
    runner.compile(meta_train.make_meta_step(family, optimizer, num_steps=config.meta.horizon,
                                             axis_name=runner.axis_name))
    state = runner.to_devices(meta_train.init_state(divergence, optimizer))
    batches = itertools.cycle(tasks)
    bodies[num_devices] = timing.Timed(
        runner.step, (state, next(batches)),
        feedback=lambda out, batches=batches: (out[0], next(batches)))
    bodies[num_devices].calibrate(warm_up=1, repeats=args.repeats)  # The first call compiles.
    runners[num_devices] = runner
  timing.round_robin(bodies)

  print('| devices | tasks per device | seconds per meta-step (median) | meta-steps / s |')
  print('| ---: | ---: | ---: | ---: |')
  baseline = bodies[device_counts[0]].median
  for num_devices, body in bodies.items():
    median = body.median
    print(f'| {num_devices} | {runners[num_devices].tasks_per_device} | {median:.3f} '
          f'({median / baseline:.2f}x of {device_counts[0]} device(s)) | {1 / median:.2f} |')
  if args.json:
    timing.write_json(args.json, {
        'config': args.config, 'meta_batch_size': args.meta_batch_size,
        'horizon': args.horizon, 'repeats': args.repeats, 'environment': env,
        'devices': {str(n): {'tasks_per_device': runners[n].tasks_per_device, **body.summary()}
                    for n, body in bodies.items()}})


if __name__ == '__main__':
  main()
