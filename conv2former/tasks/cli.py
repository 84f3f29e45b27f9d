"""``conv2former detect train|eval|predict`` and ``conv2former segment train|eval|predict``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..fileio import atomic_path, atomic_write_text
from ..training.config import model_kwargs, non_negative_float, parse_train_args, positive_int, probability
from ..training.runtime import AMP_DTYPES
from .detection import DETECTORS
from .recipes import DETECTION_RECIPES, SEGMENTATION_RECIPES

RECIPES = {'detect': DETECTION_RECIPES, 'segment': SEGMENTATION_RECIPES}


def _add_train_args(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group('setup')
    g.add_argument('--config', type=Path, help='YAML file of flag values (keys as flag names, - or _)')
    g.add_argument('--recipe', choices=sorted(RECIPES[task]), help='preset of flag defaults')
    g.add_argument('--data', help='dataset folder or .tar/.tar.gz archive (required)')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='val')
    g.add_argument('--output', type=Path, default=Path('runs'), help='parent folder of run folders (default runs/)')
    g.add_argument('--experiment', help='run folder name (default: <model>-<backbone>-<date>-<time>)')
    g.add_argument('--resume', type=Path, help='run folder or checkpoint folder to continue exactly where it stopped')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1' (default: cuda if available)")
    g.add_argument('-j', '--workers', type=int, default=2, help='data loader processes per training process')
    g.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')

    g = p.add_argument_group('model')
    if task == 'detect':
        g.add_argument('--model', default='maskrcnn', choices=DETECTORS, help='detector (default maskrcnn)')
    else:
        g.add_argument('--model', default='upernet', choices=['upernet'], help='segmenter (default upernet)')
        g.add_argument('--decoder-channels', type=positive_int, default=512)
    g.add_argument('--backbone', default='conv2former_t', help='hierarchical timm model name (default conv2former_t)')
    g.add_argument('--backbone-kwargs', type=model_kwargs, action='append', default=[], metavar='KEY=VALUE',
                   help='backbone constructor keywords, e.g. kernel_size=7 (repeatable)')
    g.add_argument('--pretrained-backbone', type=Path,
                   help='classification weights: our model or run folder, .safetensors, or upstream .pth/.pth.tar')
    g.add_argument('--drop-path', type=probability, default=0.2, help='backbone stochastic depth rate')
    g.add_argument('--sync-bn', action='store_true', help='synchronised BatchNorm across processes')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive_int, default=12)
    g.add_argument('--iters', type=positive_int, default=None, help='optimizer steps (overrides --epochs, rounded up '
                                                                     'to whole epochs)')
    g.add_argument('-b', '--batch-size', type=positive_int, default=2, help='images per process')
    g.add_argument('--grad-accum-steps', type=positive_int, default=1)
    g.add_argument('--lr', type=non_negative_float, default=1e-4)
    g.add_argument('--opt', default='adamw', help="timm optimizer name (default 'adamw')")
    g.add_argument('--weight-decay', type=non_negative_float, default=0.05)
    g.add_argument('--layer-decay', type=non_negative_float, default=None,
                   help='layer-wise lr decay over the backbone, e.g. 0.9 (default: none)')
    g.add_argument('--clip-grad', type=non_negative_float, default=None, help='max gradient norm')
    g.add_argument('--sched', default='multistep' if task == 'detect' else 'poly', help='timm scheduler name')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=(8, 11), help='multistep: epochs to decay at')
    g.add_argument('--decay-rate', type=non_negative_float, default=0.1 if task == 'detect' else 1.0,
                   help='multistep: lr factor; poly: power')
    g.add_argument('--warmup-iters', type=int, default=500 if task == 'detect' else 1500)
    g.add_argument('--warmup-ratio', type=non_negative_float, default=1e-3 if task == 'detect' else 1e-6,
                   help='warm-up starts at lr x this')
    g.add_argument('--min-lr', type=non_negative_float, default=0.0)
    g.add_argument('--amp', nargs='?', const='bf16', default=None, choices=['bf16', 'fp16'],
                   help='mixed precision (bare --amp = bf16; fp16 uses a grad scaler)')

    g = p.add_argument_group('data and augmentation')
    g.add_argument('--hflip', type=probability, default=0.5)
    g.add_argument('--photometric', action=argparse.BooleanOptionalAction, default=task == 'segment',
                   help='random photometric distortion')
    if task == 'detect':
        g.add_argument('--min-size', type=positive_int, nargs='+', default=tuple(range(480, 801, 32)),
                       help='short side(s): one picked per batch when training; the last is the test size')
        g.add_argument('--max-size', type=positive_int, default=1333, help='long side limit')
        g.add_argument('--holdout', type=int, default=50, help='Penn-Fudan: images held out as val (default 50)')
        g.add_argument('--skip-empty', action='store_true', help='skip training images without annotations')
    else:
        _add_segmentation_data_args(g)
        _add_inference_args(g)

    g = p.add_argument_group('checkpoints and outputs')
    g.add_argument('--checkpoint-steps', type=int, default=0, help='also checkpoint every N optimizer steps')
    g.add_argument('--checkpoint-hist', type=positive_int, default=3, help='keep the last N checkpoints')
    g.add_argument('--eval-every', type=positive_int, default=1, help='evaluate every N epochs (and at the end)')
    g.add_argument('--overlays', type=int, default=4, help='prediction PNGs of the first N val images (0: none)')


def _add_segmentation_data_args(g) -> None:
    g.add_argument('--crop-size', type=positive_int, nargs='+', default=(512, 512), metavar='PX',
                   help='training crop (and sliding window): H [W]')
    g.add_argument('--scale-range', type=float, nargs=2, default=(0.5, 2.0), metavar=('MIN', 'MAX'),
                   help='random rescale factors of the base size')
    g.add_argument('--base-size', type=positive_int, default=None, help='short side before rescaling (default: '
                                                                       "the image's own)")
    g.add_argument('--ignore-index', type=int, default=255)
    g.add_argument('--reduce-zero-label', action=argparse.BooleanOptionalAction, default=None,
                   help='label 0 is "other": ignore it and shift the rest down (default: ADE20k layout only)')
    g.add_argument('--num-classes', type=positive_int, default=None, help='when the layout does not name classes')
    g.add_argument('--class-names', default=None, help='comma-separated class names or a file with one per line')


def _add_inference_args(g, defaults: bool = True) -> None:
    g.add_argument('--eval-mode', choices=['whole', 'slide'], default='whole' if defaults else None,
                   help='whole image, or sliding crop-size windows')
    g.add_argument('--eval-stride', type=positive_int, nargs='+', default=None, metavar='PX',
                   help='sliding-window stride H [W] (default: 2/3 of the crop)')
    g.add_argument('--eval-scales', type=float, nargs='+', default=(1.0,) if defaults else None,
                   help='multi-scale inference factors, e.g. 0.5 0.75 1 1.25 1.5 1.75')
    g.add_argument('--eval-flip', action=argparse.BooleanOptionalAction, default=False if defaults else None,
                   help='average with the horizontally flipped image')


def _class_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else value.split(',')
    return [n.strip() for n in names if n.strip()]


def finalize_task_args(args: argparse.Namespace) -> argparse.Namespace:
    """Merge --backbone-kwargs, fill two-value sizes, check combinations."""
    if not args.data:
        raise ValueError(f'conv2former {args.task} train needs --data (a dataset folder or archive)')
    merged = {}
    for kv in args.backbone_kwargs if isinstance(args.backbone_kwargs, list) else [args.backbone_kwargs]:
        merged.update(kv)
    args.backbone_kwargs = merged
    args.decay_milestones = tuple(args.decay_milestones)
    if args.task == 'detect':
        args.min_size = tuple(args.min_size)
    else:
        args.crop_size = _size(args.crop_size, '--crop-size')
        if any(c % 32 for c in args.crop_size):
            raise ValueError(f'--crop-size must be a multiple of 32 (UperNet downsamples 32x), got {args.crop_size}')
        args.eval_stride = _size(args.eval_stride, '--eval-stride') if args.eval_stride else \
            tuple(max(1, c * 2 // 3) for c in args.crop_size)
        args.scale_range = tuple(args.scale_range)
        if not 0 < args.scale_range[0] <= args.scale_range[1]:
            raise ValueError(f'--scale-range must satisfy 0 < MIN <= MAX, got {args.scale_range}')
        args.eval_scales = tuple(args.eval_scales)
        if isinstance(args.class_names, str):
            args.class_names = _class_names(args.class_names)
    return args


def _size(values, flag: str) -> tuple[int, int]:
    values = tuple(values)
    if len(values) not in (1, 2):
        raise ValueError(f'{flag} takes one or two sizes (H [W]), got {list(values)}')
    return values if len(values) == 2 else (values[0], values[0])


# ------------------------------------------------------------------------------------------------------ commands
def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train_task
    final = train_task(args)
    metric = 'bbox_AP' if args.task == 'detect' else 'mIoU'
    shown = ', '.join(f'{k} {v:.2f}' for k, v in final.items()
                      if isinstance(v, float) and k.startswith(('bbox_AP', 'segm_AP', 'mIoU', 'pixel_acc')))
    print(f'final: {shown or "no evaluation"}  (best {metric}: {final.get(f"best_{metric}", "–")})  '
          f'run folder: {final["run_dir"]}')
    return 0


def _task_namespace(config: dict, args: argparse.Namespace) -> argparse.Namespace:
    """The settings a task object needs at evaluation time, from the model's config and the command line."""
    inference = dict(config.get('inference') or {})
    for key in ('mode', 'stride', 'scales', 'flip'):
        value = getattr(args, f'eval_{key}', None)
        if value is not None:
            inference[key] = list(value) if isinstance(value, tuple) else value
    if getattr(args, 'crop_size', None):
        inference['crop_size'] = list(_size(args.crop_size, '--crop-size'))
        inference['stride'] = [max(1, c * 2 // 3) for c in inference['crop_size']]
    if getattr(args, 'eval_stride', None):
        inference['stride'] = list(_size(args.eval_stride, '--eval-stride'))
    return argparse.Namespace(
        task=config['task'], model=config['model'], backbone=config['backbone'],
        ignore_index=config.get('ignore_index', 255), reduce_zero_label=config.get('reduce_zero_label'),
        class_names=config['class_names'], num_classes=None, inference=inference)


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..training.distributed import init_distributed
    from .datasets import (build_detection_dataset, build_segmentation_dataset, detection_transforms,
                           segmentation_transforms)
    from .engine import TASKS, load_task_model

    env = init_distributed(args.device)
    model, config = load_task_model(args.checkpoint, args.task, env.device)
    ns = _task_namespace(config, args)
    task = TASKS[args.task](ns)
    if args.task == 'detect':
        dataset = build_detection_dataset(args.data, args.split, masks=config['model'] == 'maskrcnn',
                                          holdout=args.holdout, transforms=detection_transforms(False))
        if dataset.class_names != config['class_names']:
            raise ValueError(f'{args.data} ({args.split}) classes {dataset.class_names[1:]} differ from the '
                             f"model's {config['class_names'][1:]}")
        metrics = task.evaluate(model, dataset, env, amp_dtype=AMP_DTYPES.get(args.amp), progress=True,
                                batch_size=args.batch_size, workers=args.workers)
    else:
        dataset = build_segmentation_dataset(args.data, args.split, class_names=config['class_names'],
                                             ignore_index=ns.ignore_index, reduce_zero_label=ns.reduce_zero_label,
                                             transforms=segmentation_transforms(False, ignore_index=ns.ignore_index))
        metrics = task.evaluate(model, dataset, env, amp_dtype=AMP_DTYPES.get(args.amp), progress=True,
                                workers=args.workers, settings=ns.inference)
    checkpoint = Path(args.checkpoint)
    out = Path(args.results_file or (checkpoint if checkpoint.is_dir() else Path('.')) / 'eval_results.json')
    result = dict(metrics, checkpoint=str(checkpoint), data=str(args.data), split=args.split, images=len(dataset),
                  data_cleanup=getattr(dataset, 'stats', {}))
    if args.task == 'segment':
        result['inference'] = ns.inference
    atomic_write_text(out, json.dumps(result, indent=2, default=str))
    overlay_args = dict(settings=ns.inference) if args.task == 'segment' else {}
    paths = task.overlays(model, dataset, out.parent / 'eval_overlays', args.overlays, env.device, **overlay_args)
    for key, value in metrics.items():
        if isinstance(value, dict):
            print(f'{key}:')
            for name, v in value.items():
                print(f'  {name:<24} {"–" if v is None else f"{v:6.2f}"}')
        else:
            print(f'{key:<12} {"–" if value is None else f"{value:6.2f}"}')
    print(f'results: {out}' + (f'\noverlays: {paths[0].parent}' if paths else ''))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from .engine import TASKS, _image_tensor, load_task_model
    from .visualize import detection_overlay, segmentation_overlay

    device = torch.device(args.device or 'cpu')
    model, config = load_task_model(args.checkpoint, args.task, device)
    ns = _task_namespace(config, args)
    task = TASKS[args.task](ns)
    out_dir = Path(args.output_dir)
    results = []
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f'image {path} not found')
        image = _image_tensor(path)
        stem = Path(path).stem
        if args.task == 'detect':
            pred = task.predict(model, [image], device)[0]
            keep = pred['scores'] >= args.score_threshold
            names = config['class_names']
            results.append(dict(image=str(path), detections=[
                dict(label=names[int(lbl)], score=round(float(s), 4), box=[round(float(c), 1) for c in box])
                for lbl, s, box in zip(pred['labels'][keep], pred['scores'][keep], pred['boxes'][keep])]))
            overlay = detection_overlay(image, pred, None, names, out_dir / f'{stem}.png',
                                        score_threshold=args.score_threshold)
        else:
            labels = task.predict(model, [image], device, ns.inference)[0]
            with atomic_path(out_dir / f'{stem}_labels.png') as tmp:
                Image.fromarray(labels.to(torch.uint8).numpy(), mode='L').save(tmp, format='PNG')
            overlay = segmentation_overlay(image, labels, None, config['class_names'], out_dir / f'{stem}.png',
                                           ignore_index=ns.ignore_index)
            counts = torch.bincount(labels.flatten(), minlength=len(config['class_names']))
            results.append(dict(image=str(path), labels=str(out_dir / f'{stem}_labels.png'), classes={
                config['class_names'][c]: round(100 * int(n) / labels.numel(), 2)
                for c, n in enumerate(counts.tolist()) if n}))
        results[-1]['overlay'] = str(overlay)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if args.task == 'detect':
                found = ', '.join(f'{d["label"]} {d["score"]:.2f}' for d in r['detections']) or 'nothing'
            else:
                found = ', '.join(f'{k} {v:.1f}%' for k, v in sorted(r['classes'].items(), key=lambda kv: -kv[1]))
            print(f'{r["image"]}: {found}  → {r["overlay"]}')
    return 0


def add_task_parsers(sub) -> dict:
    """Add ``detect`` and ``segment`` (each with train / eval / predict) to the top-level sub-parsers; returns the
    train parsers by task (their recipes and --config are resolved by ``parse_task_train_args``)."""
    train_parsers = {}
    for task, title in (('detect', 'object detection and instance segmentation (torchvision detectors + FPN)'),
                        ('segment', 'semantic segmentation (UperNet, segmentation_models_pytorch)')):
        top = sub.add_parser(task, help=title)
        actions = top.add_subparsers(dest='action', required=True)
        p = actions.add_parser('train', help='train or fine-tune (torchrun for several processes)')
        _add_train_args(p, task)
        p.set_defaults(func=_cmd_train, task=task, command=task)
        train_parsers[task] = p

        p = actions.add_parser('eval', help='metrics and overlays of a trained model on a split')
        p.add_argument('--checkpoint', required=True, help='run folder or its best/ / last/ model folder')
        p.add_argument('--data', required=True, help='dataset folder or archive')
        p.add_argument('--split', default='val')
        p.add_argument('-b', '--batch-size', type=positive_int, default=2)
        p.add_argument('-j', '--workers', type=int, default=2)
        p.add_argument('--device')
        p.add_argument('--amp', nargs='?', const='bf16', choices=['bf16', 'fp16'])
        p.add_argument('--overlays', type=int, default=4, help='overlay PNGs of the first N images (0: none)')
        p.add_argument('--results-file', help='JSON file (default: <checkpoint>/eval_results.json)')
        if task == 'detect':
            p.add_argument('--holdout', type=int, default=50, help='Penn-Fudan: images held out as val')
        else:
            p.add_argument('--crop-size', type=positive_int, nargs='+', default=None, metavar='PX')
            _add_inference_args(p, defaults=False)
        p.set_defaults(func=_cmd_eval, task=task)

        p = actions.add_parser('predict', help='predict images and write overlay PNGs')
        p.add_argument('images', nargs='+')
        p.add_argument('--checkpoint', required=True, help='run folder or its best/ / last/ model folder')
        p.add_argument('--output-dir', default='predictions', help='where overlays go (default predictions/)')
        p.add_argument('--device')
        p.add_argument('--json', action='store_true')
        if task == 'detect':
            p.add_argument('--score-threshold', type=probability, default=0.5)
        else:
            p.add_argument('--crop-size', type=positive_int, nargs='+', default=None, metavar='PX')
            _add_inference_args(p, defaults=False)
        p.set_defaults(func=_cmd_predict, task=task)
    return train_parsers


def parse_task_train_args(parser: argparse.ArgumentParser, task: str, argv: list[str]) -> argparse.Namespace:
    return parse_train_args(parser, argv, recipes=RECIPES[task], finalize_fn=finalize_task_args)
