"""Classification inference: loading a classifier (run folder, model folder or weights file), upstream checkpoint
conversion, prediction and export (ONNX, torch.export). Model folders are written and read by ``conv2former.fileio``.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import timm
import timm.data
import torch
import torch.nn as nn
from PIL import Image
from timm.models import split_model_name_tag

from ...data import load_rgb
from ...fileio import (CONFIG_NAME, WEIGHTS_NAME, drop_state_dict_ref, atomic_path, find_model_folder,
                       infer_num_classes, load_classifier_folder, unwrap_module, write_model_folder)
from ...models import MODEL_CONFIGS, load_state_dict_file, unwrap_state_dict
from ...models import MODEL_NAMES
from ...models.keywords import check_model_kwargs

__all__ = [
    'load_model',
    'convert_upstream',
    'predict',
    'format_predictions',
    'export_onnx',
    'export_torch',
    'fixed_size_reason',
    'onnx_input_shape',
    'onnx_metadata',
    'pt2_input_shape',
]

_logger = logging.getLogger(__name__)

_KEYWORD_LIKE = re.compile(r'^[A-Za-z_][\w-]*=')  # an argument that looks like a --model-kwargs pair
_TRANSFORM_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


# ---------------------------------------------------------------------------------------------------------------
# loading


def _known_models() -> list[str]:
    return list(MODEL_NAMES)


def _check_model_name(model_name: str, source: str | Path | None = None) -> None:
    base, _ = split_model_name_tag(model_name)
    if base not in _known_models():
        where = f' (from {source})' if source is not None else ''
        raise ValueError(f'unknown model name {model_name!r}{where}; expected one of {", ".join(_known_models())}')


def _label_names(model: nn.Module) -> list[str] | None:
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    num_classes = getattr(model, 'num_classes', None)
    if not names or not num_classes:
        return None
    if isinstance(names, Mapping):  # timm allows {index: name} when there are gaps
        names = [str(names.get(str(i), names.get(i, i))) for i in range(num_classes)]
    names = [str(n) for n in names]
    return names if len(names) == num_classes else None


def _load_weights_file(path: Path, model_name: str | None, use_ema: bool, model_kwargs: dict) -> nn.Module:
    if not model_name:
        raise ValueError(
            f'{path} is a weights file: pass the model name it belongs to (one of {", ".join(_known_models())}); '
            f'model folders and run folders need none')
    _check_model_name(model_name)
    check_model_kwargs(model_name, model_kwargs)
    raw = load_state_dict_file(path)
    try:
        state_dict = unwrap_state_dict(raw, use_ema=use_ema)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    if use_ema and not any(isinstance(raw.get(k), Mapping) for k in ('state_dict_ema', 'model_ema')):
        raise ValueError(f'use_ema: {path} holds no EMA weights (no state_dict_ema / model_ema entry)')
    model_kwargs = dict(model_kwargs)
    overlay = dict(model_kwargs.pop('pretrained_cfg_overlay', None) or {})
    overlay.update(file=str(path), state_dict=state_dict, num_classes=infer_num_classes(state_dict))
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    drop_state_dict_ref(model)
    return model


def load_model(
        checkpoint: str | Path,
        model_name: str | None = None,
        use_ema: bool = False,
        device: str | torch.device = 'cpu',
        preprocessing_given: bool = False,
        **model_kwargs: Any,
) -> tuple[nn.Module, list[str] | None, dict]:
    """Load a model for inference from a run folder, a model folder, or a weights file.

    * run folder → its ``best/`` model folder, else ``last/``;
    * model folder → ``timm.create_model('local-dir:<folder>', pretrained=True)``; ``use_ema`` loads
      ``model_ema.safetensors`` instead (error if absent); ``model_name`` is not needed (config.json names it);
    * weights file (``.safetensors`` / ``.pth`` / ``.pth.tar``, ours or upstream layout) → needs ``model_name``;
      the number of classes is read from the file's classifier; ``use_ema`` picks the ``state_dict_ema`` entry of a
      training checkpoint, otherwise its ``state_dict`` / ``model`` entry. A weights file with a ``config.json``
      beside it is built and preprocessed as that config says (no model name needed); without one a warning names
      the default preprocessing used (unless ``preprocessing_given``: the caller overrides it).

    ``model_kwargs`` go to ``timm.create_model`` (e.g. dims/depths/kernel_size of a custom configuration).
    Returns ``(model in eval mode on device, class names or None, data config)``.
    """
    path = Path(str(checkpoint).removeprefix('local-dir:'))
    if not path.exists():
        hint = f'; did you mean --model-kwargs {checkpoint}?' if _KEYWORD_LIKE.match(str(checkpoint)) else ''
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}{hint}')
    if path.is_dir():
        folder = find_model_folder(path)
        try:
            arch = json.loads((folder / CONFIG_NAME).read_text()).get('architecture')
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f'cannot read {folder / CONFIG_NAME}: {e}') from None
        if arch and not timm.is_model(arch):  # any timm model `conv2former train` can train (e.g. a ConvNeXt baseline)
            raise ValueError(f'{folder / CONFIG_NAME} names architecture {arch!r}, which timm does not know')
        if model_name and arch and split_model_name_tag(model_name)[0] != arch:
            _logger.warning('%s holds a %s model; ignoring model name %s', folder, arch, model_name)
        model = load_classifier_folder(folder, use_ema, model_kwargs)
    elif (path.parent / CONFIG_NAME).is_file():
        _logger.info('%s: architecture and preprocessing from %s', path, path.parent / CONFIG_NAME)
        model = load_classifier_folder(path.parent, use_ema and path.name == WEIGHTS_NAME, model_kwargs, weights=path)
    else:
        model = _load_weights_file(path, model_name, use_ema, model_kwargs)
    _refuse_new_head(path, model_kwargs)
    model = model.to(device).eval()
    data_config = timm.data.resolve_data_config(model=model)
    if path.is_file() and not (path.parent / CONFIG_NAME).is_file() and not preprocessing_given:
        _logger.warning('%s has no %s beside it: preprocessing uses the %s defaults (%d px, %s, crop %.3f); pass '
                        '--img-size / --interpolation / --crop-pct if it was trained otherwise', path, CONFIG_NAME,
                        model_name, data_config['input_size'][-1], data_config['interpolation'],
                        data_config['crop_pct'])
    return model, _label_names(model), data_config


def _stored_classes(path: Path) -> int | None:
    """Classifier outputs the checkpoint at ``path`` holds (0: none), or None when it cannot tell cheaply."""
    folder = find_model_folder(path) if path.is_dir() else \
        path.parent if (path.parent / CONFIG_NAME).is_file() else None
    if folder is not None and (path.is_dir() or path.name == WEIGHTS_NAME):
        config = json.loads((folder / CONFIG_NAME).read_text())
        return config.get('num_classes', (config.get('model_args') or {}).get('num_classes'))
    return infer_num_classes(unwrap_state_dict(load_state_dict_file(path)))


def _refuse_new_head(path: Path, model_kwargs: dict) -> None:
    """A classifier that did not come from the checkpoint (timm re-initialises one of another size) would evaluate
    at chance: refused, with the way to fine-tune instead."""
    requested = model_kwargs.get('num_classes')
    if requested is None:
        return
    stored = _stored_classes(path)
    if stored is not None and stored != requested:
        raise ValueError(
            f'--model-kwargs num_classes={requested}: {path} holds a {stored}-class classifier, so a '
            f'{requested}-class head would be random, not trained. Drop num_classes to use the trained head, or '
            f'fine-tune a {requested}-class model from these weights: conv2former train --pretrained {path} '
            f'--data <{requested}-class data>')


def _architecture_args(model_name: str, model_kwargs: dict) -> dict:
    """Constructor kwargs that rebuild ``model_name``: the variant's dims/depths/kernel, then ``model_kwargs``."""
    base = split_model_name_tag(model_name)[0]
    args = {}
    if base in MODEL_CONFIGS:
        dims, depths, kernel_size = MODEL_CONFIGS[base]
        args = dict(dims=list(dims), depths=list(depths), kernel_size=kernel_size)
    args.update({k: v for k, v in model_kwargs.items()
                 if v is not None and k not in ('drop_rate', 'drop_path_rate', 'pretrained_cfg_overlay')})
    return args


def convert_upstream(
        src: str | Path,
        out_dir: str | Path,
        model_name: str,
        label_names: Sequence[str] | None = None,
        **model_kwargs: Any,
) -> Path:
    """Convert an upstream checkpoint (``.pth`` / ``.pth.tar`` / ``.safetensors``) into a model folder.

    Wrapped checkpoints (``state_dict`` / ``state_dict_ema`` / ``model``, ``module.`` prefixes) are unwrapped
    (EMA weights first, timm's rule); upstream key names are mapped to ours. The number of classes comes from
    the checkpoint's classifier. ``model_kwargs`` (e.g. dims/depths/kernel_size of a custom configuration) build
    the model and are recorded in ``model_args``. A checkpoint that does not fit raises the ValueError of
    ``checkpoint_filter_fn`` listing the mismatching keys. Returns the folder (readable by :func:`load_model`
    and ``timm.create_model('local-dir:<folder>', pretrained=True)``).
    """
    src = Path(src)
    _check_model_name(model_name)
    raw = load_state_dict_file(src)
    try:
        num_classes = infer_num_classes(unwrap_state_dict(raw, use_ema=True))
    except ValueError as e:
        raise ValueError(f'{src}: {e}') from None
    model_kwargs = dict(model_kwargs)
    requested = model_kwargs.pop('num_classes', None)
    if requested is not None and requested != num_classes:
        raise ValueError(f'{src} has a {num_classes}-class classifier, num_classes={requested} was requested')
    overlay = dict(model_kwargs.pop('pretrained_cfg_overlay', None) or {})
    overlay.update(file=str(src), state_dict=raw, num_classes=num_classes)
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    drop_state_dict_ref(model)
    del raw
    model_args = dict(_architecture_args(model_name, model_kwargs), num_classes=num_classes,
                      in_chans=getattr(model, 'in_chans', 3))
    return write_model_folder(model.eval(), out_dir, model_args=model_args, label_names=label_names)


# ---------------------------------------------------------------------------------------------------------------
# prediction


def _open_rgb(image: str | Path) -> Image.Image:
    """The image at ``image`` as RGB, or a ValueError naming it as given (URLs and ``KEY=VALUE`` words explained)."""
    from ...shards import ShardImage
    text = str(image)
    if isinstance(image, ShardImage):  # a sample of WebDataset shards (predict --data)
        try:
            return image.load_rgb()
        except OSError as e:
            raise ValueError(str(e)) from None
    if re.match(r'^[a-z][a-z0-9+.-]*://', text, re.IGNORECASE):
        raise ValueError(f'{text}: a URL; predict reads local image files (download it first)')
    path = Path(image)
    if not path.exists() and _KEYWORD_LIKE.match(text):
        raise ValueError(f'image {text} not found: did you mean --model-kwargs {text}?')
    try:
        return load_rgb(path)
    except OSError as e:
        reason = str(e) if str(e).startswith(text) else f'{text}: {e}'
        raise ValueError(f'image {text} not found' if not path.exists() else reason) from None


@torch.no_grad()
def predict(
        model: nn.Module,
        images: Sequence[str | Path],
        data_config: dict,
        class_names: Sequence[str] | None = None,
        topk: int = 5,
        batch_size: int = 32,
        device: str | torch.device = 'cpu',
        skip_unreadable: bool = False,
) -> list[dict]:
    """Classify image files with timm's eval transform (resize, center crop, normalize from ``data_config``).

    The model is moved to ``device`` and run in eval mode (its training flag is restored afterwards). Returns, per
    image, ``{"image": str, "top": [{"label", "index", "prob"}, ...]}`` sorted by decreasing probability. A missing
    or unreadable image raises a ValueError naming it; with ``skip_unreadable`` its entry is
    ``{"image": str, "error": reason}`` instead and the others are classified.
    """
    if topk < 1:
        raise ValueError(f'topk must be >= 1, got {topk}')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    transform = timm.data.create_transform(**{k: data_config[k] for k in _TRANSFORM_KEYS if k in data_config})
    results = []
    with _eval_mode(model.to(device)):
        for start in range(0, len(images), batch_size):
            chunk, tensors, failed = images[start:start + batch_size], [], {}
            for i, image in enumerate(chunk):
                try:
                    tensors.append(transform(_open_rgb(image)))
                except ValueError as e:
                    if not skip_unreadable:
                        raise
                    failed[i] = str(e)
            top = iter(_top_labels(model, torch.stack(tensors).to(device), class_names, topk) if tensors else [])
            results += [dict(image=str(image), error=failed[i]) if i in failed else dict(image=str(image),
                                                                                          top=next(top))
                        for i, image in enumerate(chunk)]
    return results


def _top_labels(model: nn.Module, batch: torch.Tensor, class_names, topk: int) -> list[list[dict]]:
    logits = model(batch)
    if logits.ndim != 2:
        raise ValueError(f'the model returns {tuple(logits.shape)}, expected (batch, classes) logits')
    num_classes = logits.shape[1]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class names for a model with {num_classes} outputs')
    top_p, top_i = logits.float().softmax(dim=1).topk(min(topk, num_classes), dim=1)
    return [[dict(label=str(class_names[i]) if class_names is not None else str(i), index=int(i), prob=float(p))
             for p, i in zip(ps, idxs)] for ps, idxs in zip(top_p.tolist(), top_i.tolist())]


def format_predictions(results: list[dict]) -> str:
    """Plain-text table (image, rank, label, index, probability), one row per prediction."""
    header = ('image', 'rank', 'label', 'index', 'prob')
    rows = [(r['image'], str(rank), str(t['label']), str(t['index']), f'{t["prob"]:.4f}')
            for r in results for rank, t in enumerate(r.get('top', ()), 1)]
    rows += [(r['image'], '-', '(not classified: see the error)', '-', '-') for r in results if 'error' in r]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    right = (False, True, False, True, True)

    def fmt(row):
        return '  '.join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row, widths, right)).rstrip()

    return '\n'.join([fmt(header), '  '.join('-' * w for w in widths)] + [fmt(row) for row in rows])


# ---------------------------------------------------------------------------------------------------------------
# export


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; its training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _example(model: nn.Module, batch: int, in_chans: int, img_size: int | tuple[int, int]) -> torch.Tensor:
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    return torch.randn(batch, in_chans, height, width, device=dev, dtype=dtype)


def min_dynamic_size(model: nn.Module) -> int:
    """The smallest height/width an export with dynamic height/width admits: twice the model's total stride. Below
    it the last stage's map can be 1x1, a size the exporters specialise on (it would be fixed, not dynamic)."""
    info = getattr(model, 'feature_info', None)
    try:
        stride = int(info[-1]['reduction'])
    except (TypeError, IndexError, KeyError, ValueError):
        stride = 32
    return 2 * stride


def fixed_size_reason(model: nn.Module, img_size: int) -> str | None:
    """Why an export at ``img_size`` cannot have a dynamic height/width (None when it can)."""
    low = min_dynamic_size(model)
    if img_size >= low:
        return None
    return (f'input fixed at {img_size}x{img_size}: below {low} px the last stage\'s map can be 1x1, a size the '
            f'exporter specialises on; export with --img-size {low} or more for a dynamic height and width')


def _dynamic_dims(dynamic_batch: bool, dynamic_size: bool, min_size: int = 64) -> dict:
    """torch.export dims of the input: batch (0) and height/width (2, 3, from ``min_size``) as asked."""
    dims = {0: torch.export.Dim('batch', min=1)} if dynamic_batch else {}
    if dynamic_size:
        dims.update({2: torch.export.Dim('height', min=min_size, max=8192),
                     3: torch.export.Dim('width', min=min_size, max=8192)})
    return dims


def _size_dims_possible(model: nn.Module, example: torch.Tensor, dynamic_size: bool) -> bool:
    """Whether to try a dynamic height/width (logs why not when it was asked for but cannot be)."""
    reason = fixed_size_reason(model, min(example.shape[-2:])) if dynamic_size else None
    if reason:
        _logger.warning(reason)
    return dynamic_size and reason is None


def _quiet_export(export, *args, **kwargs):
    """Run an exporter without its warnings and symbolic-shape chatter."""
    shapes_log = logging.getLogger('torch.fx.experimental.symbolic_shapes')
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return export(*args, **kwargs)
    finally:
        shapes_log.setLevel(level)


def _export_onnx_file(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool,
                      dynamic_size: bool) -> tuple[str, str | None]:
    """Write ``path`` with the dynamo exporter (dynamic height/width from 32 px if asked, else or if that fails
    static), or with the TorchScript exporter if dynamo fails. Returns the exporter used and, when a dynamic
    height/width was asked for but could not be made, why."""
    names = dict(input_names=['input'], output_names=['logits'])
    # weights go into the .onnx file itself unless they approach protobuf's 2 GB limit
    large = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.5e9
    attempts = [(dynamic_batch, dynamic_size), (dynamic_batch, False)] if dynamic_size else [(dynamic_batch, False)]
    error, fixed = None, None
    for batch_dim, size_dims in attempts:
        try:
            # ONNX's dynamo exporter keeps a 1x1 last stage general, so its height/width can start at 32 px
            shapes = _dynamic_dims(batch_dim, size_dims, 32)
            _quiet_export(torch.onnx.export, model, (example,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=(shapes,) if shapes else None, external_data=large, **names)
            return 'dynamo', fixed
        except Exception as e:  # noqa: BLE001 - any exporter failure triggers the next attempt
            error = error or e
            if size_dims:
                fixed = (f'input fixed at {example.shape[-2]}x{example.shape[-1]}: the exporter could not make height '
                         f'and width dynamic ({_first_line(e)})')
                _logger.warning(fixed)
    msg = f'{type(error).__name__}: {_first_line(error)}'
    warnings.warn(f'dynamo ONNX export failed ({msg}); falling back to the TorchScript exporter')
    for leftover in (path, path.with_name(path.name + '.data')):
        leftover.unlink(missing_ok=True)
    axes = {'input': {0: 'batch'}, 'logits': {0: 'batch'}} if dynamic_batch else None
    try:
        _quiet_export(torch.onnx.export, model, (example,), str(path), dynamo=False, dynamic_axes=axes,
                      opset_version=17, **names)
    except Exception as legacy_error:
        raise RuntimeError(f'ONNX export failed with both exporters: dynamo: {msg}; '
                           f'TorchScript: {type(legacy_error).__name__}: {legacy_error}') from legacy_error
    return 'torchscript', ('input height and width fixed: the TorchScript exporter makes only the batch dynamic'
                           if dynamic_size else None)


def _first_line(error: Exception) -> str:
    """The first non-empty line of an error's message (exporters' messages often start with a newline)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def pt2_input_shape(path: str | Path) -> list:
    """The exported program's input shape: ints for fixed dims, names ('batch', 'height', ...) for dynamic ones."""
    program = torch.export.load(str(path))
    node = next(n for n in program.graph.nodes if n.op == 'placeholder' and
                n.name in program.graph_signature.user_inputs)
    names = {0: 'batch', 2: 'height', 3: 'width'}
    return [d if isinstance(d, int) else names.get(i, str(d)) for i, d in enumerate(node.meta['val'].shape)]


def onnx_metadata(path: str | Path) -> dict:
    """The ONNX model's ``metadata_props`` (values decoded from JSON)."""
    import onnx
    return {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}


def onnx_input_shape(path: str | Path) -> list:
    """The ONNX model's input shape: ints for fixed dims, names ('batch', 'height', ...) for dynamic ones."""
    import onnx
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _check_sizes(img_size: int, shape: list) -> list:
    """Input sizes to check an export at: the export size, and a rectangular other one where H and W are dynamic."""
    sizes = [(img_size, img_size)]
    if len(shape) == 4 and all(isinstance(d, str) for d in shape[2:]):
        sizes.append((img_size + 32, img_size + 64))
    return sizes


def _check_onnx(model: nn.Module, path: Path, exporter: str, in_chans: int, img_size: int, batch: int) -> None:
    """Outputs of onnxruntime and PyTorch agree to 1e-3 on random input(s) (skipped without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        _logger.warning('onnxruntime is not installed: %s was not checked', path)
        return
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for size in _check_sizes(img_size, onnx_input_shape(path)):
        x = _example(model, batch, in_chans, size)
        expected = model(x).detach().float().cpu().numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.float().cpu().numpy()})[0]
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float('inf')
        if not diff < 1e-3:
            raise RuntimeError(f'ONNX model {path} ({exporter} exporter) disagrees with PyTorch at {size[0]}x'
                               f'{size[1]}: max abs diff {diff:.3g} (shapes {got.shape} vs {expected.shape})')
        _logger.info('onnxruntime check at %dx%d passed (max abs diff %.2e)', *size, diff)


def _write_onnx_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    """Store ``metadata`` (values as JSON) in the model's ``metadata_props``."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=str(key), value=json.dumps(value))
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def export_onnx(
        model: nn.Module,
        path: str | Path,
        img_size: int,
        in_chans: int = 3,
        check: bool = True,
        dynamic_batch: bool = True,
        dynamic_size: bool = True,
        metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export to ONNX: the dynamo exporter first, the legacy TorchScript exporter only if that fails.

    Input ``input`` (N, C, H, W), output ``logits``; the batch dimension is dynamic if asked, and height/width with
    ``dynamic_size`` where the exporter manages (else the export is fixed at ``img_size``, with a warning and the
    reason as ``fixed_size_reason`` in ``metadata_props``; ``onnx_input_shape`` tells). Which exporter was used is logged. With ``check`` and onnxruntime installed,
    outputs on random batches (at ``img_size`` and, when dynamic, at another size) must agree to 1e-3 (RuntimeError
    otherwise). ``metadata`` (class names, preprocessing, ...) goes into ``metadata_props`` as JSON strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_mode(unwrap_module(model)) as model:
        example = _example(model, 2, in_chans, img_size)  # batch 2: a batch of 1 would be specialised
        exporter, fixed = _export_onnx_file(model, example, path, dynamic_batch, dynamic_size)
        _logger.info('exported %s with the %s ONNX exporter (input %s)', path, exporter, onnx_input_shape(path))
        metadata = dict(metadata or {}, **({'fixed_size_reason': fixed} if fixed else {}))
        if metadata:
            _write_onnx_metadata(path, metadata)
        if check:
            with torch.no_grad():
                _check_onnx(model, path, exporter, in_chans, img_size, 3 if dynamic_batch else 2)
    return path


def export_torch(model: nn.Module, path: str | Path, img_size: int, in_chans: int = 3) -> Path:
    """Export with ``torch.export`` (dynamic batch, height and width when possible, else dynamic batch, else static)
    and save a ``.pt2`` file.

    The saved program is reloaded with ``torch.export.load`` and must match the model to 1e-4 (RuntimeError
    otherwise), at ``img_size`` and, when the size is dynamic, at another one. Load it with
    ``torch.export.load(path).module()``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_mode(unwrap_module(model)) as model, torch.no_grad():
        example = _example(model, 2, in_chans, img_size)
        attempts = ((True, True), (True, False), (False, False)) if _size_dims_possible(model, example, True) else \
            ((True, False), (False, False))
        for batch_dim, size_dims in attempts:
            try:
                shapes = _dynamic_dims(batch_dim, size_dims, min_dynamic_size(model))
                program = _quiet_export(torch.export.export, model, (example,),
                                        dynamic_shapes=(shapes,) if shapes else None)
                break
            except Exception as e:  # noqa: BLE001
                if not batch_dim:
                    raise
                _logger.warning('torch.export with dims %s failed (%s); trying fewer dynamic dims', list(shapes),
                                _first_line(e))
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path))
        for size in [(img_size, img_size)] + ([(img_size + 32, img_size + 64)] if size_dims else []):
            x = _example(model, 3 if batch_dim else 2, in_chans, size)
            diff = float((loaded.module()(x) - model(x)).abs().max())
            if not diff < 1e-4:
                raise RuntimeError(f'reloaded program {path} disagrees with the model at {size}: max abs diff '
                                   f'{diff:.3g}')
    return path
