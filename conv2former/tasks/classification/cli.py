"""``conv2former train | validate | predict | convert | export``: the classification sub-commands. ``train`` builds
the options and calls the Python API; the others load a model folder (or weights file) and use this package."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...engine.distributed import launched_as_main
from ...engine.options import add_arguments, add_keywords_argument, keywords, positive_int
from ...slurm import add_slurm_arguments, train_options
from .task import ClassificationOptions


def _cmd_train(args: argparse.Namespace) -> int:
    from ...api import train
    from ...slurm import print_submitted, submit_run
    options, request = train_options(args)
    if request is not None:
        return print_submitted(submit_run('classification', options, request))
    final = train('classification', **options)
    if final.get('val_top1') is not None and launched_as_main():
        print(f'final: top-1 {final["val_top1"]:.2f}%  top-5 {final["val_top5"]:.2f}%  '
              f'(best {final.get("best_top1", final["val_top1"]):.2f}%)  run folder: {final["run_dir"]}')
    return 0


def _load(args: argparse.Namespace, device):
    """(model, class names, data config) of ``--checkpoint`` with the command's model and preprocessing flags."""
    from timm.data import resolve_data_config
    from .inference import load_model
    overrides = dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    model, class_names, _ = load_model(args.checkpoint, args.model, use_ema=args.use_ema, device=device,
                                       preprocessing_given=any(v is not None for v in overrides.values()),
                                       **keywords(args.model_kwargs))
    data_config = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    return model, class_names, data_config


def _validation_dataset(args: argparse.Namespace, data_config: dict, class_names):
    """(dataset, split description) to validate on: ``--data`` / ``--split``, by default the run's data and its
    validation split; the run's own training split is refused unless ``--allow-train-overlap``."""
    from timm.data import create_transform
    from ...data import find_split, resolve_data_dir
    from ...engine.record import from_record, refuse_train_overlap, run_record
    from ...shards import is_shard_source
    from .data import ImageFolderDataset, build_timm_datasets, is_timm_source
    run_dir, record = run_record(args.checkpoint)
    data = from_record(args.data, record, 'data', run_dir)
    if is_timm_source(data):
        _, dataset, _ = build_timm_datasets(data, from_record(args.data_dir, record, 'data_dir', run_dir))
        if class_names is not None and dataset.class_names != list(class_names):
            raise ValueError(f'{data} classes {dataset.class_names} differ from the model\'s {class_names}')
        dataset.transform = create_transform(**data_config)
        return dataset, f'{data} (validation)'
    if is_shard_source(data):
        from ...shards import shard_split_dataset, train_overlap
        dataset = shard_split_dataset(data, args.split, transform=create_transform(**data_config),
                                      class_names=class_names, strict=args.strict, mark_unreadable=True)
        if run_dir is not None:
            refuse_train_overlap(train_overlap(dataset, record.get('data')), f'--split {args.split} of {data} holds '
                                 f'training shards of {run_dir}', args.allow_train_overlap)
        return dataset, str(dataset.root)
    split_dir = find_split(resolve_data_dir(data), args.split)
    if run_dir is not None and not is_timm_source(record.get('data')) and not is_shard_source(record.get('data')):
        train_dir = find_split(resolve_data_dir(record.get('data')), 'train')
        overlap = len(_images_below(split_dir)) if split_dir.resolve() == train_dir.resolve() else 0
        refuse_train_overlap(overlap, f'--split {args.split} is {split_dir}, the training split of {run_dir}',
                             args.allow_train_overlap)
    dataset = ImageFolderDataset(split_dir, transform=create_transform(**data_config), class_names=class_names,
                                 strict=args.strict, mark_unreadable=True)
    return dataset, str(split_dir)


def _images_below(folder: Path) -> list:
    """Every image below ``folder`` (class sub-folders included)."""
    from ...data import list_images
    return [p for d in sorted(folder.iterdir()) if d.is_dir() for p in list_images(d)]


def _cmd_validate(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from ...engine.runtime import AMP_DTYPES, warn_slow_amp
    from ...fileio import StorageError
    from .evaluate import evaluate, save_confusion_matrix_png, write_results

    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    warn_slow_amp(args.amp, device)
    model, class_names, data_config = _load(args, device)
    dataset, split = _validation_dataset(args, data_config, class_names)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    result = evaluate(model, loader, device, len(dataset.class_names), amp_dtype=AMP_DTYPES.get(args.amp),
                      channels_last=args.channels_last, progress=args.progress)
    extra = dict(model=getattr(model, 'pretrained_cfg', {}).get('architecture', args.model),
                 img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
                 interpolation=data_config['interpolation'], checkpoint=str(args.checkpoint), split=split,
                 skipped_images=dataset.num_skipped)
    checkpoint = Path(args.checkpoint)
    results_file = Path(args.results_file or (checkpoint if checkpoint.is_dir() else checkpoint.parent)
                        / 'validate_results.json')
    try:
        write_results(result, dataset.class_names,
                      json_path=results_file if results_file.suffix != '.csv' else None,
                      csv_path=results_file if results_file.suffix == '.csv' else None, extra=extra)
        png = save_confusion_matrix_png(result.confusion, dataset.class_names, results_file.with_suffix('.png'))
    except OSError as e:
        print(f'top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  '
              f'({result.num_samples} images, {dataset.num_skipped} skipped)')
        raise StorageError(f'cannot write {results_file}: {e.strerror or e}; pass --results-file FILE in a writable '
                           f'folder') from None
    print(f'top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  '
          f'({result.num_samples} images, {dataset.num_skipped} skipped)')
    width = max(len(n) for n in dataset.class_names)
    for name, acc in zip(dataset.class_names, result.per_class_accuracy):
        print(f'  {name:<{width}}  {acc:6.2f}%')
    print(f'results: {results_file}\nconfusion matrix: {png}')
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference import format_predictions, predict
    images = list(args.images)
    if args.data:  # every image of a split of --data (shards or an ImageFolder), after the files given
        from ...shards import split_images
        images += split_images(args.data, args.split)
    if not images:
        raise ValueError('predict needs image files, or --data DATA (with --split) to classify a split of a dataset')
    model, class_names, data_config = _load(args, args.device or 'cpu')
    results = predict(model, images, data_config, class_names=class_names, topk=args.topk,
                      batch_size=args.batch_size, device=args.device or 'cpu', skip_unreadable=True)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    failed = [r for r in results if 'error' in r]
    for r in failed:
        print(f'conv2former: error: {r["error"]}', file=sys.stderr)
    if failed:
        print(f'conv2former: {len(failed)} of {len(results)} images could not be classified', file=sys.stderr)
    return 1 if failed else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .inference import convert_upstream
    kwargs = keywords(args.model_kwargs)
    labels = Path(args.labels).read_text().split('\n') if args.labels else None
    out = convert_upstream(args.src, args.output, args.model, label_names=[x for x in labels or [] if x] or None,
                           **kwargs)
    print(f'wrote {out} (load with timm.create_model("local-dir:{out}", pretrained=True))')
    return 0


def _export_record(model, class_names, data_config: dict, size: int) -> dict:
    """What a user of an exported model needs: class names and the preprocessing (metadata and config.json)."""
    return dict(architecture=getattr(model, 'pretrained_cfg', {}).get('architecture'), class_names=class_names,
                num_classes=getattr(model, 'num_classes', None), input_size=[data_config['input_size'][0], size, size],
                interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                crop_mode=data_config.get('crop_mode', 'center'), mean=list(data_config['mean']),
                std=list(data_config['std']))


def _cmd_export(args: argparse.Namespace) -> int:
    from ...fileio import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text
    from .inference import (export_onnx, export_torch, fixed_size_reason, onnx_input_shape, onnx_metadata,
                            pt2_input_shape)
    if (args.output / WEIGHTS_NAME).is_file():
        raise ValueError(f'--output {args.output} is a model folder: the export\'s {CONFIG_NAME} would replace its '
                         f'own; choose another folder')
    model, class_names, data_config = _load(args, 'cpu')
    size = args.img_size or data_config['input_size'][-1]
    record = _export_record(model, class_names, data_config, size)
    args.output.mkdir(parents=True, exist_ok=True)
    in_chans = data_config['input_size'][0]
    if args.format in ('onnx', 'all'):
        onnx_path = export_onnx(model, args.output / 'model.onnx', size, in_chans=in_chans, metadata=record)
        record['onnx_input'] = onnx_input_shape(onnx_path)
        fixed = onnx_metadata(onnx_path).get('fixed_size_reason')  # one read of the file's metadata
        if fixed:
            record['onnx_fixed_size_reason'] = fixed
        print(f'ONNX: {onnx_path} (input {record["onnx_input"]})')
    if args.format in ('torch', 'all'):
        pt2_path = export_torch(model, args.output / 'model.pt2', size, in_chans=in_chans)
        record['pt2_input'] = pt2_input_shape(pt2_path)
        if not all(isinstance(d, str) for d in record['pt2_input'][2:]):
            record['pt2_fixed_size_reason'] = fixed_size_reason(model, size) or \
                'torch.export could not make height and width dynamic (the log says why)'
        print(f'torch.export: {pt2_path} (input {record["pt2_input"]})')
    atomic_write_text(args.output / CONFIG_NAME, json.dumps(record, indent=2) + '\n')
    print(f'class names and preprocessing: {args.output / CONFIG_NAME}')
    return 0


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--checkpoint', required=True,
                   help='run folder, model folder (config.json + model.safetensors), or a weights file (with '
                        '--model unless a config.json lies beside it)')
    p.add_argument('--model', help='model name, needed for a weights file without a config.json beside it')
    add_keywords_argument(p, default=[], help='model constructor keywords of a weights file, e.g. kernel_size=7 '
                                              'dims=[64,128,256,512] (one or more, as in train)')
    p.add_argument('--use-ema', action='store_true', help='use the EMA weights of the checkpoint')


def _add_preprocessing_args(p: argparse.ArgumentParser) -> None:
    """Flags that override the model folder's saved preprocessing (what the run evaluated with)."""
    p.add_argument('--img-size', type=positive_int, help='default: the model folder\'s (the run\'s) size')
    p.add_argument('--crop-pct', type=float, help='default: the model folder\'s')
    p.add_argument('--interpolation', help='default: the model folder\'s')
    p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True,
                   help='progress bar (--no-progress for logs and scripts)')


def add_parsers(sub) -> None:
    """Add ``train``, ``validate``, ``predict``, ``convert`` and ``export`` to the top-level sub-parsers."""
    p = sub.add_parser('train', help='train or fine-tune a classifier (torchrun for several processes)',
                       description='Precedence, lowest first: defaults < --recipe < --config YAML < flags given.')
    add_arguments(p, ClassificationOptions)
    add_slurm_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser('validate', help='top-1/top-5, per-class accuracy and confusion matrix on a split')
    _add_checkpoint_args(p)
    p.add_argument('--data', help="ImageFolder tree, archive or timm source (default: the run's data, else the "
                                  "bundled dataset)")
    p.add_argument('--data-dir', help='root folder of a timm source')
    p.add_argument('--split', default='val', help="split folder (synonyms accepted; default 'val')")
    p.add_argument('--allow-train-overlap', action='store_true',
                   help="score the run's own training split anyway (refused otherwise; logged as a warning)")
    _add_preprocessing_args(p)
    p.add_argument('-b', '--batch-size', type=int, default=64)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--device')
    p.add_argument('--amp', nargs='?', const='bf16', choices=['bf16', 'fp16'])
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--strict', action='store_true',
                   help='fail on unreadable images (and links left out of the listing) instead of skipping them')
    p.add_argument('--results-file', help='.json or .csv (default: validate_results.json in the checkpoint folder, '
                                          'or beside a weights file)')
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser('predict', help='top-k labels for images')
    p.add_argument('images', nargs='*')
    p.add_argument('--data', help='also classify every image of --split of this dataset (WebDataset shards, an '
                                  'ImageFolder tree or archive)')
    p.add_argument('--split', default='val', help="split of --data (synonyms accepted; default 'val')")
    _add_checkpoint_args(p)
    _add_preprocessing_args(p)
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--device')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('convert', help='upstream .pth/.pth.tar → model folder (safetensors + config.json)')
    p.add_argument('src')
    p.add_argument('--model', required=True, help='registered model name of the checkpoint')
    p.add_argument('--output', required=True, type=Path)
    add_keywords_argument(p, default=[], help='model constructor keywords (one or more, as in train)')
    p.add_argument('--labels', help='text file with one class name per line')
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('export', help='ONNX (checked with onnxruntime when installed) and torch.export, dynamic '
                                      'batch/height/width where the model allows, with a config.json of class names '
                                      'and preprocessing')
    _add_checkpoint_args(p)
    p.add_argument('--output', required=True, type=Path)
    p.add_argument('--format', choices=['onnx', 'torch', 'all'], default='all')
    _add_preprocessing_args(p)
    p.set_defaults(func=_cmd_export)

