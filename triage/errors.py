"""One exception root for triage; retry policies key on the subclasses."""

from __future__ import annotations


class TriageError(Exception):
    """Root of every error triage raises on purpose."""


class ConfigError(TriageError):
    """The configuration cannot be used; the message names the field and the reason."""


class DataDirInUseError(TriageError):
    """Another ``triage serve`` holds the data directory."""


class RetryableError(TriageError):
    """A failure that may go away by itself (a PACS that is down, a busy database)."""


class PermanentError(TriageError):
    """A failure that retrying will not fix (a malformed dataset, a missing series)."""


class DicomInputError(PermanentError):
    """A received or imported dataset that cannot be used."""


class DatasetMismatchError(DicomInputError):
    """The dataset's SOP Class or Instance UID is not the one the C-STORE request named."""


class OutOfResourcesError(RetryableError):
    """The spool is below its free-space reserve or the system applies backpressure."""


class DestinationUnavailableError(RetryableError):
    """A destination could not be reached or refused the association."""
