"""Checkpoints: Hugging Face safetensors in and out (hf.py), orbax train state (state.py)."""
