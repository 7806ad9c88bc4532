"""User-facing errors: the CLI prints these as one line instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix (missing file, malformed data). Exit status 1."""

    exit_code = 1


class ConfigError(UserError):
    """Bad configuration or arguments (unknown key, wrong type). Exit status 2."""

    exit_code = 2
