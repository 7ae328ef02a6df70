"""triage: radiology triage beside the PACS."""

__version__ = "0.1.0"
