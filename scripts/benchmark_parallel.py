"""Meta-steps per second against the number of (fake CPU) devices the tasks are sharded over.

A sanity check of the sharding overhead, not of speed-up: fake CPU devices share the same
cores. Run on a machine with accelerators to measure real scaling.

  python scripts/benchmark_parallel.py --devices 1 2 4 --config configs/digits_mlp.py
"""

import argparse
import os
import sys


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4])
  parser.add_argument('--config', default='configs/digits_mlp.py')
  parser.add_argument('--meta-batch-size', type=int, default=8)
  parser.add_argument('--horizon', type=int, default=20)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={max(args.devices)}')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import functools
  import importlib.util
  import statistics
  import time

  import jax

  from experiments import builders
  from metamd_jax import meta_train, parallel

  spec = importlib.util.spec_from_file_location('config_module', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.meta.horizon = args.horizon
  config.meta.meta_batch_size = args.meta_batch_size
  family, _ = builders.build_families(config)
  optimizer = builders.build_meta_optimizer(config)
  divergence = builders.build_divergence(config, family)
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, '
        f'{jax.device_count()} devices, {os.cpu_count()} cpus; config {args.config}, '
        f'meta-batch {args.meta_batch_size}, horizon {args.horizon}')
  print('| devices | tasks per device | seconds per meta-step (median) | meta-steps / s |')
  print('| ---: | ---: | ---: | ---: |')
  baseline = None
  for num_devices in args.devices:
    build = functools.partial(meta_train.make_meta_step, family, optimizer,
                              num_steps=config.meta.horizon)
    runner = parallel.MetaStepRunner(lambda axis, build=build: build(axis_name=axis),
                                     args.meta_batch_size, num_devices)
    state = runner.to_devices(meta_train.init_state(divergence, optimizer))
    key = jax.random.key(0)
    state, _ = runner.step(state, meta_train.sample_tasks(family, key, 0, args.meta_batch_size))
    times = []
    for step in range(1, args.repeats + 1):
      tasks = meta_train.sample_tasks(family, key, step, args.meta_batch_size)
      started = time.perf_counter()
      state, _ = runner.step(state, tasks)
      times.append(time.perf_counter() - started)
    median = statistics.median(times)
    baseline = baseline or median
    print(f'| {num_devices} | {runner.tasks_per_device} | {median:.3f} '
          f'({median / baseline:.2f}x of 1 device) | {1 / median:.2f} |')


if __name__ == '__main__':
  main()
