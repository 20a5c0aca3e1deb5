"""A small ResNet on CIFAR-10 python batches the user provides (never downloaded).

  python -m experiments.main --config configs/cifar10_resnet.py --workdir runs/cifar \\
      --config.task.data_dir=/path/to/cifar-10-batches-py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.task.dataset = 'cifar10'
  config.task.model = 'resnet'
  config.task.channels = (16, 32, 64)
  config.task.batch_size = 64
  config.task.subset_size = 5000
  config.meta.horizon = 50
  config.meta.meta_batch_size = 2
  return config
