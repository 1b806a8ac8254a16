"""The application: the ``sparse-engine`` command line, the training loop, data and the example models."""
