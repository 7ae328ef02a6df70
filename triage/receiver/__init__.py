"""The DICOM listener: association policy, C-ECHO and C-STORE handlers, durable spool."""
