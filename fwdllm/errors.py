"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

import click


class UserError(click.ClickException):
    """Bad input the user can fix (missing file, wrong hash, bad config...)."""

    exit_code = 2
