"""Dense-prediction tasks on Conv2Former backbones."""
from .detection import DETECTORS, Conv2FormerFPN, build_detector

__all__ = ['DETECTORS', 'Conv2FormerFPN', 'build_detector']
