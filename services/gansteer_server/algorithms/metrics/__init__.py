"""Offline image metrics: diversity of one set, distance between two sets, class accuracy under a judge.

Images are float NCHW in [-1, 1] of any size >= 32. Every metric returns a `MetricResult` that records its N, the
resize applied before the feature network and the models used. Nothing downloads: feature-based metrics run in a
given classifier's features (`FeatureSpace`, normally the built-in `scenes-clf`) and say so with `_builtin`.
"""

from gansteer_server.algorithms.metrics.classification import accuracy
from gansteer_server.algorithms.metrics.distribution import fid_builtin, kid_builtin, precision_recall_builtin
from gansteer_server.algorithms.metrics.diversity import lpips_builtin, ms_ssim_3s_k7, random_pairs
from gansteer_server.algorithms.metrics.features import FeatureSpace, embed, resize_to
from gansteer_server.algorithms.metrics.result import MetricResult

__all__ = [
    "FeatureSpace",
    "MetricResult",
    "accuracy",
    "embed",
    "fid_builtin",
    "kid_builtin",
    "lpips_builtin",
    "ms_ssim_3s_k7",
    "precision_recall_builtin",
    "random_pairs",
    "resize_to",
]
