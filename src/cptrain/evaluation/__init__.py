"""Evaluation: validation losses per task, continual-learning metrics and lm-evaluation-harness
(downstream) with its offline tasks."""
