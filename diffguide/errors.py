class UserError(Exception):
    """A mistake the user can fix (bad config, missing weights or data).

    The entrypoints print it as one line and exit non-zero, before any long work starts.
    """


def instantiate(node):
    """hydra.utils.instantiate, with a UserError raised inside a target surfaced as it is (Hydra wraps it)."""
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node)
    except Exception as exc:
        cause = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C a command has answered: `message` says what was kept and how to go on (the entry point prints it as
    its one line and exits 130)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class FolderRefused(UserError):
    """The output folder is not this run's to write (another run holds it, or it holds samples of other settings):
    the run stops in one line and changes nothing there (no failed.json, no .hydra/ record)."""
