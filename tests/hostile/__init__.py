"""Hostile and broken checkpoint files for ckptsurgeon's robustness tests (see corpus.py)."""
