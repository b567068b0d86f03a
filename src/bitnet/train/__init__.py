"""Training: config, schedule, optimizer, step, loop, checkpoints, run directory."""
