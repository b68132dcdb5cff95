"""Errors of the converter command."""


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, nothing written."""
