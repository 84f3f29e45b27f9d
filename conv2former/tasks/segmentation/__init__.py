"""Semantic segmentation: UperNet on a timm backbone (``build_segmenter``, ``predict_segmentation``), CamVid /
ADE20k / generic data, mIoU. Needs the ``segmentation`` extra (segmentation-models-pytorch)."""


def __getattr__(name: str):
    if name in ('build_segmenter', 'predict_segmentation'):
        from .. import require_extra
        require_extra('segmentation')
        from . import model
        return getattr(model, name)
    raise AttributeError(name)


__all__ = ['build_segmenter', 'predict_segmentation']
