"""Training: the run config, set-up (shared with RL), optimizer, losses, jitted steps, the trainer loop and its
metrics."""
