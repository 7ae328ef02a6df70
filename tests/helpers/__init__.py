"""Helpers shared by the tests: processes, peers, synthetic data."""
