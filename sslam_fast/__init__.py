"""sslam-fast: fast, faithful SSLAM / EAT audio self-supervised pretraining."""
from .config import ConfigError, SSLAMConfig
from .model import CNNDecoder, Encoder
from .pretrainer import Draws, SSLAMPretrainer
from .released.formats import load_pretrainer, save_pretrainer
from .serialization import CheckpointError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "SSLAMConfig",
    "Encoder",
    "CNNDecoder",
    "Draws",
    "SSLAMPretrainer",
    "load_pretrainer",
    "save_pretrainer",
]
