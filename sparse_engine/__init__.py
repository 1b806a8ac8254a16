"""sparse_engine: train sparse neural networks fast and ship them small."""
# torch first: the optional compiled extension links against libc10 / libtorch.
import torch  # noqa: F401

__version__ = "0.1.0"
