"""Benchmarks run from the ``keyetron bench`` command."""
