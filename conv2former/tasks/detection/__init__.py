"""Object detection and instance segmentation: torchvision detectors on a Conv2Former FPN (``build_detector``), COCO
and Penn-Fudan data, COCO AP. Needs the ``detection`` extra (pycocotools) for data and metrics."""
from .model import DETECTORS, Conv2FormerFPN, build_detector

__all__ = ['DETECTORS', 'Conv2FormerFPN', 'build_detector']
