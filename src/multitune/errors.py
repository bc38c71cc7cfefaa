"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit status 2, with no traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it."""
