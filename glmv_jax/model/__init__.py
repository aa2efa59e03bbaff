"""Flax Linen modules of GLM-4.1V. Every parameter carries logical axis names from its creation."""
