"""PyTorch adapter: collect input statistics from a model, swap layers for factorized ones.

This sub-package is the only place that imports ``torch``; the decompositions it calls live
in ``tensorly_dataaware.decomposition`` and run on TensorLy's ``pytorch`` backend.
"""

from .compress import (
    LayerJob,
    LayerReport,
    compress,
    decompose_layer,
    format_report,
    plan_compression,
)
from .sequential import compress_sequential, layer_call_order
from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d, build_from_spec
from .ranks import allocate_budget, ranks_for_energy, ranks_for_ratio
from .sensitivity import output_fisher
from .serialization import compression_spec, load_compressed, save_compressed
from .statistics import (
    CrossStatistics,
    LayerStatistics,
    collect_covariances,
    load_statistics,
    merge_statistics,
    patches_for,
    save_statistics,
)

__all__ = [
    "collect_covariances",
    "compress",
    "compress_sequential",
    "layer_call_order",
    "plan_compression",
    "decompose_layer",
    "LayerJob",
    "LayerStatistics",
    "CrossStatistics",
    "patches_for",
    "save_statistics",
    "load_statistics",
    "merge_statistics",
    "LayerReport",
    "format_report",
    "save_compressed",
    "load_compressed",
    "compression_spec",
    "Tucker2Conv2d",
    "CPConv2d",
    "LowRankConv2d",
    "LowRankLinear",
    "build_from_spec",
    "ranks_for_ratio",
    "ranks_for_energy",
    "allocate_budget",
    "output_fisher",
]

# Deployment (issue 11): fastest equivalent layer forms, export.
from .deploy import DeployReport, LayerLatency, format_deploy_report, optimize_for_inference  # noqa: E402
from .fold import fold_batchnorm  # noqa: E402

__all__ += ["optimize_for_inference", "DeployReport", "LayerLatency", "format_deploy_report", "fold_batchnorm"]
from .export import check_onnx, export_onnx  # noqa: E402

__all__ += ["export_onnx", "check_onnx"]
from .tltorch import to_tltorch  # noqa: E402  (imports tensorly-torch only when called)

__all__ += ["to_tltorch"]
