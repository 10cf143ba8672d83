class UserError(Exception):
    """A mistake the user can fix (bad config, missing weights or data).

    The entrypoints print it as one line and exit non-zero, before any long work starts.
    """
