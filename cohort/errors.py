"""The one exception type the command line turns into a one-line message."""


class CohortError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback.

    ``where`` names the file (and, for topology errors, the key) the problem is in.
    """

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message
