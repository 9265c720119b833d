"""Evaluation: validation losses per task, continual-learning metrics, lm-evaluation-harness
(downstream), and weight interpolation with the start model (merge)."""
