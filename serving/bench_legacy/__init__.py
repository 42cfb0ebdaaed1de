"""Bench-only: the fixed-slot engine of commit 9297f40, for side-by-side runs (``serving.bench``)."""
