"""Semantic-segmentation metrics: mIoU, pixel and mean class accuracy from a confusion matrix, accumulated per process
and merged across ``torch.distributed`` ranks with ``synchronize()`` (a no-op without a process group). Results are
percentages."""
from __future__ import annotations


import torch
import torch.distributed as dist

__all__ = ['SegmentationMetric']


class SegmentationMetric:
    """Confusion matrix of label maps (rows: ground truth, columns: prediction), int64 on the CPU.

    Pixels whose target is ``ignore_index`` are skipped. ``compute`` follows mmseg's conventions: a class's IoU is
    TP / (GT + predicted - TP) and its accuracy TP / GT (recall). A class with no GT and no predicted pixel (union 0)
    has IoU None; a class without GT pixels has accuracy None; None entries are left out of the means (nanmean), so a
    class predicted but absent from the GT counts as IoU 0.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if int(num_classes) < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def _check_values(self, name: str, values: torch.Tensor, allowed_extra: int | None = None) -> None:
        bad = (values < 0) | (values >= self.num_classes)
        if allowed_extra is not None:
            bad &= values != allowed_extra
        if bad.any():
            found = torch.unique(values[bad]).tolist()
            extra = f' or ignore_index {allowed_extra}' if allowed_extra is not None else ''
            raise ValueError(f'{name} has values {found[:10]}{" ..." if len(found) > 10 else ""}; expected 0..'
                             f'{self.num_classes - 1}{extra}')

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add label maps of the same shape ([N, H, W] or [H, W], integer class ids)."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f'prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}')
        for name, t in (('prediction', pred), ('target', target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f'{name} must be an integer label map, got dtype {t.dtype} (argmax the logits first)')
        target = target.long()
        pred = pred.long()
        self._check_values('target', target, allowed_extra=self.ignore_index)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        self._check_values('prediction', pred)
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes ** 2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes).cpu()

    def synchronize(self) -> None:
        """Sum the matrices of all ranks (all_reduce); a no-op without a process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device('cpu')
        if dist.get_backend() == 'nccl':
            device = torch.device('cuda', torch.cuda.current_device())
        total = self.confusion.to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self.confusion = total.cpu()

    def compute(self) -> dict:
        """``mIoU``, ``pixel_acc`` (correct / labelled pixels), ``mean_acc`` (mean class recall) in percent (None when
        nothing is defined), ``per_class_iou`` / ``per_class_acc`` lists (percent or None) and ``confusion``."""
        cm = self.confusion.double()
        tp = cm.diag()
        gt = cm.sum(1)
        predicted = cm.sum(0)
        union = gt + predicted - tp
        per_class_iou = [100 * float(t / u) if u > 0 else None for t, u in zip(tp, union)]
        per_class_acc = [100 * float(t / g) if g > 0 else None for t, g in zip(tp, gt)]

        def mean(values: list) -> float | None:
            defined = [v for v in values if v is not None]
            return sum(defined) / len(defined) if defined else None

        labelled = float(gt.sum())
        return dict(mIoU=mean(per_class_iou), pixel_acc=100 * float(tp.sum()) / labelled if labelled else None,
                    mean_acc=mean(per_class_acc), per_class_iou=per_class_iou, per_class_acc=per_class_acc,
                    confusion=self.confusion.clone())
