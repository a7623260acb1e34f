"""The one exception type for bad user input: the CLI prints its message and exits with code 2."""


class UserInputError(Exception):
    """A problem the user can fix (a flag, a file, a folder); the message says what to do."""
