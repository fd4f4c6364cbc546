"""The one error type every converter raises for bad input."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the key or field."""
