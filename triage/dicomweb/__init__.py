"""DICOMweb served by triage: STOW-RS ingest (``stow``)."""
