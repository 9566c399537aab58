"""rnnkern: fused LSTM, GRU and Elman-RNN kernels for PyTorch.

``from rnnkern import LSTM`` in place of ``torch.nn.LSTM``: same arguments, parameters,
state_dict and outputs, with the implementation chosen per call (``backend="auto"``).
"""

from ._version import __version__
from .backends import BackendUnavailableError, available_backends
from .convert import convert
from .decode import Decoder
from .nn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, RNNInputError, explain

__all__ = [
    "__version__",
    "available_backends",
    "BackendUnavailableError",
    "RNNInputError",
    "LSTM",
    "GRU",
    "RNN",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "Decoder",
    "explain",
    "convert",
]
