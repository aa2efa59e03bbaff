"""Training: optimizer, losses, jitted steps, the trainer loop and its metrics."""
