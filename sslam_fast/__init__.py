"""sslam-fast: fast, faithful SSLAM / EAT audio self-supervised pretraining."""
from .config import ConfigError, SSLAMConfig
from .model import CNNDecoder, Encoder
from .pretrainer import Draws, SSLAMPretrainer
from .released.encoder import AudioClassifier, AudioEncoder, load_classifier, load_encoder
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
    "AudioEncoder",
    "AudioClassifier",
    "load_encoder",
    "load_classifier",
]
