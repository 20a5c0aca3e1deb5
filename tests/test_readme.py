"""The README's optax example runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_optax_example_runs():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
  example = next(b for b in blocks if 'metamd_jax.metamd(divergence)' in b)
  namespace = {}
  exec(compile(example, str(README), 'exec'), namespace)  # noqa: S102
  jax, optax = namespace['jax'], namespace['optax']
  # The example's divergence is SGD(0.1): its step equals optax's clipped SGD step.
  initial = namespace['model'].init(jax.random.key(0), namespace['x'])['params']
  reference = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
  updates, _ = reference.update(jax.grad(namespace['loss_fn'])(initial),
                                reference.init(initial), initial)
  expected = optax.apply_updates(initial, updates)
  for a, b in zip(jax.tree.leaves(namespace['params']), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
