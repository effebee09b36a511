"""User-facing errors: one clear line and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input the user can fix (missing file, wrong hash, bad config...).

    Raised anywhere; every ``fwdllm`` command turns it into one line on
    stderr and exit status :attr:`exit_code` (:class:`fwdllm.options.Command`).
    """

    exit_code = 2
