"""A tiny version of the whole pipeline (seconds on a CPU): smoke tests and CI."""

from configs import default


def get_config():
  config = default.get_config()
  config.task.dataset = 'digits'
  config.task.hidden_sizes = (8,)
  config.task.batch_size = 16
  config.task.subset_size = 200
  config.meta.init_learning_rate = 0.1  # the tests' SGD reference
  config.meta.horizon = 5
  config.meta.meta_batch_size = 2
  config.meta.num_meta_steps = 4
  config.meta.checkpoint_every = 2
  config.eval.num_tasks = 2
  config.eval.num_validation_tasks = 2
  config.eval.num_tune_tasks = 1
  config.eval.num_steps = 10
  config.eval.window = 3
  config.eval.learning_rates = (0.01, 0.1)
  # The everyday changes cost one Adam tuning and one run per optimiser each (about 40 s
  # each on 2 busy cores); e.g. --config.eval.shifts="('inputs_x2',)" runs one.
  config.eval.shifts = ()
  return config
