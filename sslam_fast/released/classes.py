"""The 527 AudioSet classes in the order of the released heads' logits.

``audioset_classes.csv`` is the AudioSet ontology index (``index,mid,display_name``), data by Google
under CC BY-SA 4.0 (https://research.google.com/audioset/), taken unchanged from
``egs/audioset/data/class_labels_indices.csv`` of github.com/YuanGongND/ast (commit 31088be8), the
same list EAT's ``inference/labels.csv`` holds.
"""
import csv
import functools
import os
from typing import List, NamedTuple

CLASSES_CSV = os.path.join(os.path.dirname(__file__), "audioset_classes.csv")


class AudioSetClass(NamedTuple):
    index: int
    mid: str
    name: str


@functools.lru_cache(maxsize=1)
def audioset_classes() -> List[AudioSetClass]:
    with open(CLASSES_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    classes = [AudioSetClass(int(r["index"]), r["mid"], r["display_name"]) for r in rows]
    if [c.index for c in classes] != list(range(527)):
        raise ValueError(f"{CLASSES_CSV}: expected the indices 0..526 in order")
    return classes


def class_names(num_classes: int) -> List[str]:
    """Display names for a head of ``num_classes`` logits: AudioSet's for 527, else "class <i>"."""
    if num_classes == 527:
        return [c.name for c in audioset_classes()]
    return [f"class {i}" for i in range(num_classes)]
