"""Run three meta-steps on fake CPU devices (and, optionally, several processes).

Used by tests/test_parallel.py in subprocesses, because the device count and the
distributed runtime must be set before JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice_run.py OUT.json
  python tests/multidevice_run.py OUT.json --processes 2 --process-id 0 --port 12345
"""

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('output')
  parser.add_argument('--x64', action='store_true')
  parser.add_argument('--devices', type=int, nargs='+', default=[1, 4])
  parser.add_argument('--processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--port', type=int, default=0)
  args = parser.parse_args()

  import jax

  if args.x64:
    jax.config.update('jax_enable_x64', True)
  if args.processes > 1:
    from metamd_jax import parallel

    parallel.initialize_distributed(f'127.0.0.1:{args.port}', args.processes, args.process_id)
  import numpy as np
  import optax
  from helpers import QuadraticFamily

  import metamd_jax
  from metamd_jax import meta_train, parallel

  family = QuadraticFamily(shape=(4, 3))
  dtype = jax.numpy.float64 if args.x64 else jax.numpy.float32
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2, dtype=dtype)
  results = {'process_count': jax.process_count(), 'device_count': jax.device_count()}
  for num_devices in args.devices:
    out = {}
    for name, optimizer, steps in (('gradient', optax.sgd(1.0), 1),
                                   ('three_steps', optax.adam(0.05), 3)):
      traces = []
      runner = parallel.MetaStepRunner(meta_batch_size=8, num_devices=num_devices)
      meta_step = meta_train.make_meta_step(family, optimizer, num_steps=4,
                                            axis_name=runner.axis_name)

      def counted(*call_args, traces=traces, meta_step=meta_step):
        traces.append(1)  # runs once per compilation
        return meta_step(*call_args)

      runner.compile(counted)
      state = runner.to_devices(meta_train.init_state(divergence, optimizer))
      for step in range(steps):
        tasks = meta_train.sample_tasks(family, jax.random.key(0), step, 8)
        state, _ = runner.step(state, tasks)
      learned = runner.to_host(state).divergence
      leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(learned)]
      if name == 'gradient':  # SGD(1): the update is minus the mean meta-gradient
        leaves = [a - np.asarray(b, np.float64)
                  for a, b in zip(jax.tree.leaves(divergence), leaves)]
      out[name] = [x.tolist() for x in leaves]
      out[name + '_traces'] = len(traces)
    # The library trainer, sharded the same way: its divergence and history.
    result = meta_train.fit(family, divergence, optax.adam(0.05), num_meta_steps=3,
                            horizon=4, meta_batch_size=8, key=jax.random.key(0),
                            select='last', num_devices=num_devices)
    out['fit'] = [np.asarray(x, np.float64).tolist() for x in jax.tree.leaves(result.divergence)]
    out['fit_meta_loss'] = [r['meta_loss'] for r in result.history]
    results[str(num_devices)] = out
  if parallel.is_writer():
    pathlib.Path(args.output).write_text(json.dumps(results))
  if args.processes > 1:
    jax.distributed.shutdown()


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  main()
