"""The one exception type for mistakes a user can make (bad file, bad config, bad request)."""


class TunesmithError(Exception):
    """A user-caused error: the message says what went wrong, where, and how to fix it."""
