"""What a model looks at: effective receptive fields, modulation maps and class activation maps."""
from .common import load_analysis_model, select_images
from .erf import THRESHOLDS, area_ratios, erf_map

__all__ = ['THRESHOLDS', 'area_ratios', 'erf_map', 'load_analysis_model', 'select_images']
