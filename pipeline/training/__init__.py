"""Training: the loop, schedules, losses, augmentation, checkpoints and calibration."""
