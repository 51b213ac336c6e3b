"""The error every command reports as one line and an exit code, never a traceback."""


class UserFacingError(Exception):
    """Something the user can fix; the message says what and how."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
