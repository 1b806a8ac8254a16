"""Triton kernels, installed as `sparse_engine.kernels`. Importing this package imports no kernel."""
