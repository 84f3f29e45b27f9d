"""Evaluation: top-1/top-5, loss, per-class accuracy and confusion matrix (DDP-aware), plus result files and a plot.

>>> result = evaluate(model, loader, torch.device('cuda'), num_classes=1000, amp_dtype=torch.bfloat16)
>>> write_results(result, class_names, json_path='results.json', extra=dict(model='conv2former_t'))
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ...fileio import atomic_path, atomic_write_text


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent, top-min(5, num_classes)
    loss: float  # mean cross-entropy (no label smoothing) over samples
    num_samples: int
    per_class_accuracy: list[float]  # percent per class, nan for a class without samples
    confusion: torch.Tensor  # (num_classes, num_classes) int64, rows = true class, cols = predicted class
    num_skipped: int = 0  # unreadable images (target -1): outside every metric

    def as_dict(self, class_names: list[str] | None = None) -> dict:
        """JSON-friendly scalars (timm ``validate.py`` keys, nan as None); per-class accuracy keyed by class name when
        ``class_names`` is given, else a list indexed by class."""
        per_class = [_finite(a) for a in self.per_class_accuracy]
        if class_names is not None:
            if len(class_names) != len(per_class):
                raise ValueError(f'{len(class_names)} class names for {len(per_class)} classes')
            per_class = dict(zip(class_names, per_class))
        return dict(top1=_finite(self.top1), top1_err=_finite(100 - self.top1), top5=_finite(self.top5),
                    top5_err=_finite(100 - self.top5), loss=_finite(self.loss, 6), num_samples=self.num_samples,
                    skipped_images=self.num_skipped, per_class_accuracy=per_class)


def _finite(x: float, ndigits: int = 4) -> float | None:
    return None if math.isnan(x) else round(x, ndigits)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device | str, num_classes: int,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False, distributed: bool = False,
             progress: bool = True, desc: str = 'eval') -> EvalResult:
    """Evaluate ``model`` over ``loader`` (``(images, targets)`` batches with integer targets; target -1 marks an
    unreadable image, counted in ``num_skipped`` and left out of every metric).

    Loss sum, top-k hits and the confusion matrix are accumulated as device tensors (no per-batch host sync unless the
    progress bar is shown). With ``distributed`` and an initialized ``torch.distributed`` group they are all-reduced
    (SUM), so every rank returns the global result; each rank must then iterate its own shard of the data. A
    ``DistributedSampler`` pads the dataset to a multiple of the world size by repeating samples, so up to
    ``world_size - 1`` samples may be counted twice (``num_samples`` reports what was counted); use a sampler without
    padding for exact numbers. The progress bar (running top-1, img/s) shows on rank 0 only. The model's training mode
    is restored on return.
    """
    device = torch.device(device)
    k = min(5, num_classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct_k = torch.zeros((), dtype=torch.int64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    reduce = distributed and dist.is_available() and dist.is_initialized()
    show = progress and (not reduce or dist.get_rank() == 0)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    was_training = model.training
    model.eval()
    try:
        seen, start = 0, time.perf_counter()
        with tqdm(loader, desc=desc, unit='batch', disable=not show, dynamic_ncols=True) as bar:
            for images, targets in bar:
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                targets = targets.to(device, non_blocking=True).long()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(images)
                keep = targets >= 0
                skipped += (~keep).sum()
                logits, targets = logits.float()[keep], targets[keep]
                loss_sum += F.cross_entropy(logits, targets, reduction='sum')
                topk = logits.topk(k, dim=1).indices
                correct_k += (topk == targets[:, None]).any(dim=1).sum()
                confusion += torch.bincount(targets * num_classes + topk[:, 0], minlength=num_classes * num_classes)
                if show:
                    seen += targets.numel()
                    top1 = confusion.view(num_classes, num_classes).diagonal().sum().item() / seen * 100
                    bar.set_postfix(top1=f'{top1:.2f}', img_s=f'{seen / (time.perf_counter() - start):.0f}',
                                    refresh=False)
    finally:
        model.train(was_training)
    stats = torch.stack([loss_sum, correct_k.double(), skipped.double()])
    if reduce:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
    confusion = confusion.view(num_classes, num_classes).cpu()
    loss_total, hits_k, num_skipped = stats.tolist()
    n = int(confusion.sum())
    hits = confusion.diagonal()
    per_class = confusion.sum(dim=1)
    per_class_accuracy = torch.where(per_class > 0, hits.double() / per_class.clamp(min=1) * 100, math.nan)
    return EvalResult(
        top1=100 * int(hits.sum()) / n if n else math.nan,
        top5=100 * round(hits_k) / n if n else math.nan,
        loss=loss_total / n if n else math.nan,
        num_samples=n,
        per_class_accuracy=per_class_accuracy.tolist(),
        confusion=confusion,
        num_skipped=round(num_skipped),
    )


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[:width - 1] + '…'


def save_confusion_matrix_png(confusion: torch.Tensor, class_names: list[str], path, normalize: bool = True,
                              title: str = 'Confusion matrix') -> Path:
    """Plot ``confusion`` (rows = true class) to a PNG with the Agg backend (no display needed).

    Colours are row-normalised (fraction of each true class) unless ``normalize`` is False; counts are annotated up to
    30 classes and class names label the axes up to 100 classes (class indices beyond). Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = confusion.detach().cpu().long()
    n = counts.shape[0]
    if counts.shape != (n, n) or len(class_names) != n:
        raise ValueError(f'confusion of shape {tuple(counts.shape)} does not match {len(class_names)} class names')
    values = counts.double()
    if normalize:
        values = values / values.sum(dim=1, keepdim=True).clamp(min=1)
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)

    side = min(4 + 0.25 * n, 30)  # inches
    fig = Figure(figsize=(side + 1.5, side), layout='constrained')
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap='Blues', vmin=0, vmax=vmax, interpolation='nearest')
    fig.colorbar(image, ax=ax, shrink=0.8, label='fraction of true class' if normalize else 'count')
    ax.set_title(f'{title} (row-normalised)' if normalize else title)
    if n <= 100:
        fontsize = 10 if n <= 30 else 7
        labels = [_short(c) for c in class_names]
        ax.set_xticks(range(n), labels, rotation=45, ha='right', rotation_mode='anchor', fontsize=fontsize)
        ax.set_yticks(range(n), labels, fontsize=fontsize)
        ax.set(xlabel='Predicted class', ylabel='True class')
    else:
        ax.set(xlabel='Predicted class (index)', ylabel='True class (index)')
    if n <= 30:
        fontsize = max(6.0, min(12.0, 200 / n))
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(counts[i, j])), ha='center', va='center', fontsize=fontsize,
                        color='white' if values[i, j] > 0.5 * vmax else 'black')
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)
    return Path(path)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def write_results(result: EvalResult, class_names: list[str], json_path=None, csv_path=None,
                  extra: dict | None = None) -> None:
    """Write ``result`` atomically as JSON (scalars, ``extra``, per-class accuracy by class name) and/or as a one-row
    CSV in timm ``validate.py`` style (``extra['model']`` first, then the scalar metrics, then other scalar extras)."""
    extra = extra or {}
    scalars = result.as_dict(class_names)
    per_class = scalars.pop('per_class_accuracy')
    if json_path is not None:
        payload = {**scalars, **extra, 'per_class_accuracy': per_class}
        atomic_write_text(json_path, json.dumps(payload, indent=2) + '\n')
    if csv_path is not None:
        row = {'model': extra['model']} if 'model' in extra else {}
        row.update(scalars)
        row.update({k: v for k, v in extra.items() if k != 'model' and _is_scalar(v)})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(row), lineterminator='\n')
        writer.writeheader()
        writer.writerow(row)
        atomic_write_text(csv_path, buffer.getvalue())
