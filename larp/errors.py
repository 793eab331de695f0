"""Exception types shared across LaRP.

Every user-facing failure is one of these so the CLI, the sweep and the HTTP server can turn it
into a clear message (or a 4xx) instead of a traceback.
"""


class LaRPError(ValueError):
    """Base class: something the user gave us (config, file, input) is wrong."""


class ConfigError(LaRPError):
    """A configuration value or combination is invalid."""


class BackboneError(LaRPError):
    """The open_clip backbone cannot be built or its weights cannot be found/loaded."""


class CheckpointError(LaRPError):
    """A LaRP checkpoint is missing, tampered with, of the wrong format or for another backbone."""


class InputError(LaRPError):
    """An image tensor given to the model has the wrong shape, dtype or size."""
