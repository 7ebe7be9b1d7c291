"""The HEAR 2021 API for SSLAM / EAT encoders (policy and details: ``sslam_fast.released.hear``).

    model = sslam_fast.hear.load_model("SSLAM_pretrain.pt")
    scene = sslam_fast.hear.get_scene_embeddings(audio, model)               # [n, D]
    emb, ms = sslam_fast.hear.get_timestamp_embeddings(audio, model)        # [n, T, D], [n, T]
"""
from .released.hear import HearModel, get_scene_embeddings, get_timestamp_embeddings, load_model

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings"]
