"""Meta-train MetaMD from a config, then meta-test it against tuned baselines.

  python -m experiments.main --config configs/default.py --workdir runs/default
  python -m experiments.main --config configs/default.py --workdir runs/x \
      --config.meta.learning_rate=3e-4 --mode meta_train
"""

import os

# jaxlib's CPU Cholesky and triangular solves run on OpenBLAS, whose idle worker threads
# spin and compete with XLA's own threads; one BLAS thread is faster on small machines
# (about 1.5x per meta-step on 2 cores). Set before numpy loads; a user's value wins.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli, evaluate, meta_train  # noqa: E402
from metamd_jax import parallel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'all', ['all', 'meta_train', 'evaluate'], 'What to run.')
flags.DEFINE_bool('distributed', False,
                  'Multi-process run (TPU pod, SLURM, ...): call jax.distributed.initialize; '
                  'the cluster is detected unless the coordinator flags are given.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')
config_flags.DEFINE_config_file('config', 'configs/default.py', 'Experiment config file.',
                                lock_config=True)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  cli.start(argv)
  if FLAGS.distributed:
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
  logging.info('JAX devices: %s', parallel.describe())
  config = FLAGS.config
  divergence = None
  if FLAGS.mode in ('all', 'meta_train'):
    divergence = meta_train.meta_train(config, FLAGS.workdir).divergence
  if FLAGS.mode in ('all', 'evaluate'):
    evaluate.evaluate(config, FLAGS.workdir, divergence)


if __name__ == '__main__':
  app.run(main)
