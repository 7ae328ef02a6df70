"""Pure DICOM encoding: DIMSE command sets, the file meta, the header reader, status names and
UIDs. No database, network or broker code (an import-linter contract)."""
