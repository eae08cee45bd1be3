"""Former home of the training loop, now `pipeline.training` (loop, schedule, checkpoint,
distributed). Kept as re-exports so imports written before the split keep working."""

from pipeline.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from pipeline.training.distributed import relaunch_with_torchrun, under_torchrun
from pipeline.training.loop import Distillation, TrainConfig, TrainResult, fit

TrainTask = Distillation  # the protocol's former name

__all__ = ["CHECKPOINT_FORMAT", "Distillation", "TrainConfig", "TrainResult", "TrainTask", "fit", "load_checkpoint",
           "relaunch_with_torchrun", "under_torchrun"]
