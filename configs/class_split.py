"""Class split: meta-train on MNIST digits 0-4, meta-test on digits 5-9."""

from configs import default


def get_config():
  config = default.get_config()
  config.task.classes = (0, 1, 2, 3, 4)
  config.task.eval_classes = (5, 6, 7, 8, 9)
  config.task.subset_size = 1000
  return config
