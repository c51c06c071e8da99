"""The one exception type for mistakes a user can fix; the CLI prints its message as a single line."""


class UserError(Exception):
    """Bad input (config, paths, weights). The message says what is wrong and how to fix it."""
