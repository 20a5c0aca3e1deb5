"""Type aliases shared by the library's modules."""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any
"""A pytree of arrays (parameters, gradients, a divergence, task parameters)."""

Array = jax.Array
