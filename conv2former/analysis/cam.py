"""Class activation maps with the ``pytorch-grad-cam`` package (``grad-cam`` on PyPI)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .common import eval_transform, load_image_tensor
from .plotting import overlay_grid

__all__ = ['CAM_METHODS', 'cam_class', 'class_activation_maps', 'plot_cams']

CAM_METHODS = ('gradcam', 'gradcam++', 'eigencam')


def cam_class(method: str):
    """The pytorch-grad-cam class for ``method``; a ValueError naming the extra when the package is missing
    (the CLI prints it as one line)."""
    try:
        import pytorch_grad_cam
    except ImportError as e:
        raise ValueError('`conv2former analyze cam` needs the pytorch-grad-cam package, which is not installed: '
                         f'pip install "conv2former[analysis]" (or pip install grad-cam) ({e})') from e
    classes = dict(gradcam=pytorch_grad_cam.GradCAM, **{'gradcam++': pytorch_grad_cam.GradCAMPlusPlus},
                   eigencam=pytorch_grad_cam.EigenCAM)
    if method not in classes:
        raise ValueError(f'unknown CAM method {method!r}; expected one of {", ".join(CAM_METHODS)}')
    return classes[method]


def resolve_class(target: str | None, class_names: Sequence[str] | None, num_classes: int) -> int | None:
    """``--target-class`` as an index or a class name; None: the predicted class of each image."""
    if target is None:
        return None
    if class_names is not None and target in class_names:
        return list(class_names).index(target)
    try:
        index = int(target)
    except ValueError:
        names = f'one of {", ".join(class_names)} or ' if class_names is not None else ''
        raise ValueError(f'--target-class {target!r} is not a class of the model: expected {names}'
                         f'an index 0..{num_classes - 1}') from None
    if not 0 <= index < num_classes:
        raise ValueError(f'--target-class {index} is out of range: the model has {num_classes} classes')
    return index


def class_activation_maps(model: nn.Module, layer: nn.Module, images: Sequence[Path], data_config: dict,
                          img_size: int | None, methods: Sequence[str], target: int | None = None,
                          progress: bool = True) -> list[dict]:
    """Per image: the RGB image, class probabilities, the target class and one CAM (H, W in [0, 1]) per method."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cams = {m: cam_class(m)(model=model, target_layers=[layer]) for m in methods}
    transform = eval_transform(data_config, img_size)
    device = next(model.parameters()).device
    results = []
    try:
        for path in tqdm(images, desc='CAM', unit='img', disable=not progress):
            x, rgb = load_image_tensor(path, transform)
            x = x.unsqueeze(0).to(device)
            with torch.no_grad():
                logits = model(x)
            if logits.ndim != 2:
                raise ValueError(f'the model returns {tuple(logits.shape)}, expected (batch, classes) logits')
            probs = logits.float().softmax(1)[0].cpu()
            cls = int(probs.argmax()) if target is None else target
            maps = {m: cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)])[0] for m, cam in cams.items()}
            results.append(dict(image=path, rgb=rgb, probs=probs, target=cls, cams=maps))
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()
    return results


def cam_stats(cam: np.ndarray) -> dict:
    """Peak position (fraction of height/width) and the share of the image above half the peak."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return dict(peak_yx=[round(float(y) / cam.shape[0], 4), round(float(x) / cam.shape[1], 4)],
                area_above_half=float((cam >= 0.5 * cam.max()).mean()) if cam.max() > 0 else 0.0)


def plot_cams(results: Sequence[dict], path: Path, label_fn) -> Path:
    """One row per image: the image, then one overlay per method."""
    rows = []
    for r in results:
        pred = int(r['probs'].argmax())
        title = f'{Path(r["image"]).name}\npred {label_fn(pred)} ({float(r["probs"][pred]):.2f})'
        rows.append([(r['rgb'], None, title)] + [(r['rgb'], cam, f'{m}: {label_fn(r["target"])}')
                                                 for m, cam in r['cams'].items()])
    return overlay_grid(rows, path)
