"""The error every command reports as one line and an exit code, never a traceback."""


class UserFacingError(Exception):
    """Something the user can fix; the message says what and how."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class PolicyUnknown(UserFacingError):
    """Whether a namespace has a policy cannot be read (no permission to list them):
    `keys rotate` then needs to be told how to rotate, or falls back with a warning."""
