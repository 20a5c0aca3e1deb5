"""Task families for meta-training and meta-testing."""

from metamd_jax.tasks.base import Task, TaskFamily
from metamd_jax.tasks.classification import ClassificationFamily
from metamd_jax.tasks.convex import LeastSquaresFamily, LogisticRegressionFamily
from metamd_jax.tasks.language_model import LanguageModelFamily

__all__ = (
  'ClassificationFamily',
  'LanguageModelFamily',
  'LeastSquaresFamily',
  'LogisticRegressionFamily',
  'Task',
  'TaskFamily',
)
