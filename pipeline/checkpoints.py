"""Former home of `student-clap ckpt`, now `pipeline.training.checkpoint` (with the checkpoint
format, save, load and reset). Kept as re-exports so imports written before the move keep working."""

from pipeline.training.checkpoint import describe, list_checkpoints, main, parameter_count, reset

__all__ = ["describe", "list_checkpoints", "main", "parameter_count", "reset"]
