"""ekd: Evaluation-oriented Knowledge Distillation for face recognition."""

__version__ = "0.1.0"
