"""Accuracy measurements: perplexity now; zero-shot tasks and GLUE build on the same model."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
