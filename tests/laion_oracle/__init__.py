"""Offline import harness for the laion_clap oracle (test-only; see hf_cache.py and run_laion.py)."""
