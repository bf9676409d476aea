"""Training: the jitted dense step, embedding schedules, the loop, checkpoints and export."""
