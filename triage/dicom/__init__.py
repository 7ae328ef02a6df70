"""Pure DICOM helpers: UIDs, status codes, series to volume, tag access."""
