"""rnnkern: fused LSTM, GRU and Elman-RNN kernels for PyTorch."""

from ._version import __version__
from .backends import available_backends

__all__ = ["__version__", "available_backends"]
