"""Dense-prediction tasks on Conv2Former backbones: detection / instance segmentation (torchvision detectors on an
FPN) and semantic segmentation (UperNet), with their datasets, metrics, overlays and the ``detect``/``segment``
commands."""
from .detection import DETECTORS, Conv2FormerFPN, build_detector
from .segmentation import build_segmenter, predict_segmentation

__all__ = ['DETECTORS', 'Conv2FormerFPN', 'build_detector', 'build_segmenter', 'predict_segmentation']
