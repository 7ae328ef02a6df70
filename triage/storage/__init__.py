"""Durable storage shared by the receiver, the ingest path and the workers."""
