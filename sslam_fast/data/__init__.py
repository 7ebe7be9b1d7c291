"""The audio front end and the data path: ``audio`` (Kaldi-exact fbank), ``manifest`` (fairseq
manifests and labels), ``loader`` (the sharded, resumable loader), ``dali`` (the DALI backend),
``tools`` (check-data, norm-stats, demo data)."""
from .loader import AudioLoader, build_loader, epoch_order, read_clip
from .manifest import (Manifest, ManifestError, load_manifest, read_class_names, read_label_descriptors,
                       read_labels, read_manifest, scan_folder, write_manifest)
from .tools import check_manifest, make_demo_dataset, norm_stats, write_clean_manifest

__all__ = [
    "AudioLoader", "Manifest", "ManifestError", "build_loader", "check_manifest", "epoch_order",
    "load_manifest", "make_demo_dataset", "norm_stats", "read_clip", "read_class_names", "read_label_descriptors",
    "read_labels", "read_manifest", "scan_folder", "write_clean_manifest", "write_manifest",
]
