"""The HEAR 2021 API with timestamp embeddings every 40 ms (HEAR asks for at most 50 ms for its
music-transcription tasks); ``sslam_fast.hear`` gives them every 160 ms, one per patch row.

The cost: four encoder passes per clip for timestamp embeddings instead of one (policy in
``sslam_fast.released.hear``); scene embeddings are the same one pass.

    model = sslam_fast.hear_40ms.load_model("SSLAM_pretrain.pt")
    emb, ms = sslam_fast.hear_40ms.get_timestamp_embeddings(audio, model)   # [n, T, D], [n, T]: 80, 120, ...
"""
from typing import Optional

from .released.hear import HearModel, get_scene_embeddings, get_timestamp_embeddings
from .released.hear import load_model as _load_model

HOP_MS = 40.0

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings"]


def load_model(model_file_path: str = "", which: str = "student", batch_size: int = 8,
               norm_mean: Optional[float] = None, norm_std: Optional[float] = None) -> HearModel:
    """HEAR ``load_model`` (any checkpoint ``load_encoder`` reads), timestamps every 40 ms."""
    return _load_model(model_file_path, which, batch_size, norm_mean, norm_std, hop_ms=HOP_MS)
