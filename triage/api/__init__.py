"""HTTP: JSON API, the web worklist page, health and metrics."""
