"""User-facing errors.

Every error a user can cause (bad config, wrong adapter for the base, missing model, malformed data) is a
``LoratuneError``: the CLI prints its message as one line and exits non-zero, without a traceback.
"""


class LoratuneError(Exception):
    """Base class for errors caused by user input; the message says what is wrong and what to do."""


class ConfigError(LoratuneError, ValueError):
    """An invalid configuration value or key."""


class AdapterLoadError(LoratuneError):
    """An adapter that does not fit the model it is loaded into (keys, shapes, format)."""


class ModelNotFoundError(LoratuneError, FileNotFoundError):
    """A base model that cannot be found or read."""


class DataError(LoratuneError, ValueError):
    """Malformed training or evaluation data; the message names the file and line (``path:line: what``)."""


class FileAccessError(LoratuneError):
    """A file that cannot be read or written: missing, damaged (truncated, wrong format), permission denied,
    disk full. The message names the path and the reason."""
