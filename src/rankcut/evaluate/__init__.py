"""Accuracy measurements: perplexity, zero-shot multiple choice, GSM8K, GLUE."""

from .perplexity import PerplexityResult, perplexity
from .tasks import ZERO_SHOT_SIX, TaskResult, parse_tasks, run_task

__all__ = ["PerplexityResult", "TaskResult", "ZERO_SHOT_SIX", "parse_tasks", "perplexity", "run_task"]
