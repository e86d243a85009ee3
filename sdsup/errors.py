"""User-facing errors: the CLIs print these as one line, without a traceback."""


class SdsupError(Exception):
    """Bad input that the user can fix: a config value, a file, a shape, a prompt."""


class ConfigError(SdsupError, ValueError):
    """A config key or value that is wrong; the message names the key."""
