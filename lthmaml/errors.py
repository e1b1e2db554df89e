"""Errors a user can fix: the CLI prints them as one line, never as a traceback from inside torch."""


class LthmamlError(Exception):
    """Bad input or configuration. The message names the file or option and the fix."""


class ConfigError(LthmamlError, ValueError):
    """An option, or a combination of options, that cannot work."""


class DataError(LthmamlError, ValueError):
    """A data root, folder, or file that cannot be read as asked."""
