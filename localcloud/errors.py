"""The one error localcloud raises for anything a user can fix; printed as one line."""


class LocalCloudError(Exception):
    """A start-up or configuration problem, with the fix in its message."""
