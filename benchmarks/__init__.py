"""Measurements of zmqexecutor (the full suite comparing peers is a later milestone)."""
