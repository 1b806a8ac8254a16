"""The application built on the library: the ``sparse-engine`` command line and what it runs.

cli.py (the entry point and ``train``), config.py (TrainConfig, derived from the method configs),
loop.py (one training run), checkpoint.py (the run's training state: write, read, resume, rebuild),
compare.py (methods side by side), data.py (Fashion-MNIST and synthetic tasks), models.py (the example
models), extract_cli.py (``export``, ``bench-infer``), bench_cli.py (``bench``), info.py (``info``).
"""
