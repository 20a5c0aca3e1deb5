"""Task families for meta-training and meta-testing."""

from metamd_jax.tasks.base import Task, TaskFamily

__all__ = ('Task', 'TaskFamily')
