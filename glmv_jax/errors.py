"""The errors a user can cause, as one family: the CLI prints one line for a `GlmvError` and lets anything
else (an internal bug) show its traceback. Each kind is also a `ValueError` (bad input) so callers that
catch the builtin keep working. Imports nothing."""
from __future__ import annotations


class GlmvError(Exception):
    """Base of every error caused by the user's input, files or settings (never by a bug of ours)."""


class ConfigError(GlmvError, ValueError):
    """A configuration that cannot describe a model or a run (unknown key, inconsistent sizes)."""


class InputError(GlmvError, ValueError):
    """Model inputs that do not fit together (shapes, vocabulary range, placeholders against grids)."""


class MeshError(GlmvError, ValueError):
    """A mesh or a shape that cannot be sharded as asked."""


class CheckpointError(GlmvError, ValueError):
    """A checkpoint that is missing, corrupt, or does not match the model or run it is loaded into."""


class DataError(GlmvError, ValueError):
    """Data that cannot be read or turned into examples (missing or corrupt file, bad record)."""
