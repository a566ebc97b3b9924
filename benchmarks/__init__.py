"""Benchmarks of attention_ext. The one command: ``python -m benchmarks.run`` (see benchmarks/run.py)."""
