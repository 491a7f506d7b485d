"""Datasets, their preprocessing, collators and the teacher-embedding cache.

Named sources and the recipes' data arguments are in :mod:`mmkd.data.sources`; builders of the real sets in
:mod:`~mmkd.data.coco`, :mod:`~mmkd.data.conceptual_captions`, :mod:`~mmkd.data.fashion_mnist` and
:mod:`~mmkd.data.shapes`; matching pairs in :mod:`~mmkd.data.pairs`; per-shard teacher sidecars for webdataset streams in
:mod:`~mmkd.data.sidecars`.
"""

from mmkd.data.baddata import BadDataError, BadDataReport
from mmkd.data.cache import StaleCacheError, cache_teacher_embeddings, load_cached_embeddings
from mmkd.data.coco import build_coco_matching
from mmkd.data.collators import CLIPDistillationCollator, MatchCollator
from mmkd.data.conceptual_captions import load_conceptual_captions, shard_for_process
from mmkd.data.fashion_mnist import fashion_mnist_captions, fashion_mnist_classification
from mmkd.data.shapes import shapes_dataset
from mmkd.data.sidecars import ViewSpec, build_sidecars, stream_with_sidecars

__all__ = [
    "BadDataError",
    "BadDataReport",
    "CLIPDistillationCollator",
    "MatchCollator",
    "ViewSpec",
    "StaleCacheError",
    "build_coco_matching",
    "build_sidecars",
    "cache_teacher_embeddings",
    "fashion_mnist_captions",
    "fashion_mnist_classification",
    "load_cached_embeddings",
    "load_conceptual_captions",
    "shapes_dataset",
    "shard_for_process",
    "stream_with_sidecars",
]
