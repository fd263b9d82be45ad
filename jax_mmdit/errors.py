"""`UserError`: something the user asked for or gave is wrong (a config value, a path, a dataset,
a checkpoint, a run directory). The command line prints it as one `mmdit: error:` line and exits
non-zero; any other exception is a bug and keeps its traceback. It is a ValueError, so code that
catches ValueError from a config keeps working."""


class UserError(ValueError):
    """An error in the user's input or setup, stated in one sentence that says what to change."""
