"""Fault injection and load against the real Docker engine, through the public API."""
