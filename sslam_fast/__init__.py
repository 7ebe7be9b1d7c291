"""sslam-fast: fast, faithful SSLAM / EAT audio self-supervised pretraining."""
from .config import ConfigError, SSLAMConfig
from .model import CNNDecoder, Encoder
from .pretrainer import Draws, SSLAMPretrainer

__all__ = ["ConfigError", "SSLAMConfig", "Encoder", "CNNDecoder", "Draws", "SSLAMPretrainer"]
