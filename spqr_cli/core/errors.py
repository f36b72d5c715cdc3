"""User-facing errors: the CLI prints their message on one line and exits non-zero, without a traceback."""


class SpQRError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model). The message says how."""


class ConfigError(ValueError):
    """A user-facing configuration problem (bad flag, unknown preset or method); printed like ``SpQRError``."""
