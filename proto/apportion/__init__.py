"""Apportion: the API package (generated messages live in apportion.v1)."""
