"""Segmentation metrics per foreground class per volume, with voxel spacing, accumulate-then-aggregate."""
from action.metrics.segmentation import SegmentationMetrics, binary_metrics, surface_distances

__all__ = ["SegmentationMetrics", "binary_metrics", "surface_distances"]
