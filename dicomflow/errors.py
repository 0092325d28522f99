"""The exceptions dicomflow raises.

Every error is a ``DicomflowError``; callers decide on retries by class::

    DicomflowError
     +-- ConfigError        bad settings; fails start-up, names the setting and the fix
     +-- PermanentError     retrying cannot help: log it, record it, do not raise to the platform
     |    +-- NotDicomError header check failed; the file goes to quarantine
     |    `-- Refused       an operator command cannot act as asked; nothing was changed
     `-- TransientError     429, 5xx, timeouts: retry with backoff, then let the platform retry
"""


class DicomflowError(Exception):
    """Root of every dicomflow error."""


class ConfigError(DicomflowError):
    """A setting is missing or invalid."""

    def __init__(self, setting: str, problem: str, fix: str) -> None:
        self.setting = setting
        self.problem = problem
        self.fix = fix
        super().__init__(f"{setting}: {problem}. Fix: {fix}")


class PermanentError(DicomflowError):
    """An error that a retry cannot fix."""


class NotDicomError(PermanentError):
    """The object failed the DICOM header check."""


class Refused(PermanentError):
    """An operator command (restore, resolve) cannot act as asked; nothing was changed."""


class TransientError(DicomflowError):
    """An error that a later retry may fix (429, 5xx, timeouts)."""
