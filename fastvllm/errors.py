"""One exception type whose message is a single line a user can act on.

The CLI prints ``str(err)`` and exits non-zero; everything that can go wrong in a way the
user can fix is raised as a :class:`FastvllmError` with the fix in the message.
"""


class FastvllmError(Exception):
    """A failure with a one-line explanation and a fix."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if not fix else f"{message}; {fix}")


class SnapshotInvalid(FastvllmError):
    """The snapshot directory is missing, incomplete, corrupt or does not match."""


class CriuFailed(FastvllmError):
    """CRIU refused or failed; the message is distilled from its log."""


class ServerFailed(FastvllmError):
    """The vLLM server did not start, answer, or answer correctly."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (an orchestrator stopping us, a closed terminal).

    Raised in the main thread by the CLI's handler, so that the clean-up every command
    already runs for Ctrl-C and for errors (``except BaseException``: kill a half-restored
    or released tree, remove the partial snapshot and the /dev/shm objects put back) runs
    for these signals too, instead of the process dying with its debris left behind. A
    BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signum}")
