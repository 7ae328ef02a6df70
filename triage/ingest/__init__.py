"""Index rows, study completion, routing rules and job creation."""
