"""Benchmarks that print figures (`make bench`, or `python -m bench [trunk|pipeline]`); not timed tests."""
