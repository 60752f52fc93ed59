"""The one exception type for mistakes a user can fix (config, data, paths).

The CLI prints its message as a single sentence and exits with code 2; anything
else that escapes is an internal bug and keeps its traceback.
"""

import difflib


class UserError(Exception):
    """A problem in the user's input, described in one sentence that says what to do."""


def did_you_mean(word: str, choices) -> str:
    """' — did you mean 'x'?' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""
