"""The package's error types. Each message names what is wrong (file, key, value, row, step)
and what is allowed; all derive from SkipvisionError, a ValueError, so a caller (or a CLI,
which prints one line and exits 2) can tell a bad input from a bug."""


class SkipvisionError(ValueError):
    """Base of the errors below."""


class ConfigError(SkipvisionError):
    """A configuration value of the wrong type or out of range."""


class CheckpointError(SkipvisionError):
    """A checkpoint that cannot be found, read, trusted or fitted to its config."""


class InputError(SkipvisionError):
    """A bad image, prompt, token id or generation setting."""


class NonFiniteError(SkipvisionError):
    """NaN or inf in weights, pixels, logits or a loss."""
