"""Helpers for the tests that drive a paused flow run through approval."""
