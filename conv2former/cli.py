"""``conv2former`` command line: train, validate, predict, info, convert, export (classification) and
``detect`` / ``segment`` train|eval|predict (dense tasks)."""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import conv2former


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import model_info
    names = args.models or list(conv2former.MODEL_NAMES)
    infos = [model_info(n, img_size=args.img_size) for n in names]
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    print(f'{"model":<20} {"params (M)":>11} {"GMACs @" + str(args.img_size):>12}  features (stride: channels)')
    for i in infos:
        feats = ', '.join(f'{r}: {c}' for r, c in i.features)
        print(f'{i.name:<20} {i.params / 1e6:>11.3f} {i.macs / 1e9:>12.3f}  {feats}')
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import train
    final = train(args)
    if final.get('val_top1') is not None:
        print(f'final: top-1 {final["val_top1"]:.2f}%  top-5 {final["val_top5"]:.2f}%  '
              f'(best {final.get("best_top1", final["val_top1"]):.2f}%)  run folder: {final["run_dir"]}')
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import torch
    from timm.data import create_transform, resolve_data_config
    from torch.utils.data import DataLoader

    from .data import ImageFolderDataset, build_timm_datasets, find_split, is_timm_source, resolve_data_dir
    from .evaluate import evaluate, save_confusion_matrix_png, write_results
    from .inference import load_model
    from .training.runtime import AMP_DTYPES

    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model, class_names, data_config = load_model(args.checkpoint, args.model, use_ema=args.use_ema, device=device)
    overrides = dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    data_config = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    if is_timm_source(args.data):
        _, dataset, _ = build_timm_datasets(args.data, args.data_dir)
        if class_names is not None and dataset.class_names != list(class_names):
            raise ValueError(f'{args.data} classes {dataset.class_names} differ from the model\'s {class_names}')
        dataset.transform, split_dir = create_transform(**data_config), f'{args.data} (validation)'
    else:
        split_dir = find_split(resolve_data_dir(args.data), args.split)
        dataset = ImageFolderDataset(split_dir, transform=create_transform(**data_config), class_names=class_names,
                                     strict=args.strict)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    result = evaluate(model, loader, device, len(dataset.class_names), amp_dtype=AMP_DTYPES.get(args.amp),
                      channels_last=args.channels_last)
    extra = dict(model=getattr(model, 'pretrained_cfg', {}).get('architecture', args.model),
                 img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
                 interpolation=data_config['interpolation'], checkpoint=str(args.checkpoint), split=str(split_dir),
                 skipped_images=dataset.num_skipped)
    checkpoint = Path(args.checkpoint)
    default_dir = checkpoint if checkpoint.is_dir() else Path('.')
    results_file = Path(args.results_file or default_dir / 'validate_results.json')
    write_results(result, dataset.class_names,
                  json_path=results_file if results_file.suffix != '.csv' else None,
                  csv_path=results_file if results_file.suffix == '.csv' else None, extra=extra)
    png = save_confusion_matrix_png(result.confusion, dataset.class_names, results_file.with_suffix('.png'))
    print(f'top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  '
          f'({result.num_samples} images, {dataset.num_skipped} skipped)')
    width = max(len(n) for n in dataset.class_names)
    for name, acc in zip(dataset.class_names, result.per_class_accuracy):
        print(f'  {name:<{width}}  {acc:6.2f}%')
    print(f'results: {results_file}\nconfusion matrix: {png}')
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference import format_predictions, load_model, predict
    model, class_names, data_config = load_model(args.checkpoint, args.model, use_ema=args.use_ema,
                                                 device=args.device or 'cpu')
    results = predict(model, args.images, data_config, class_names=class_names, topk=args.topk,
                      batch_size=args.batch_size, device=args.device or 'cpu')
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .inference import convert_upstream
    from .training.config import model_kwargs
    kwargs = {}
    for kv in args.model_kwargs:
        kwargs.update(model_kwargs(kv))
    labels = Path(args.labels).read_text().split('\n') if args.labels else None
    out = convert_upstream(args.src, args.output, args.model, label_names=[x for x in labels or [] if x] or None,
                           **kwargs)
    print(f'wrote {out} (load with timm.create_model("local-dir:{out}", pretrained=True))')
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .inference import export_onnx, export_torch, load_model
    model, _, data_config = load_model(args.checkpoint, args.model, use_ema=args.use_ema)
    size = args.img_size or data_config['input_size'][-1]
    args.output.mkdir(parents=True, exist_ok=True)
    in_chans = data_config['input_size'][0]
    if args.format in ('onnx', 'all'):
        print(f'ONNX: {export_onnx(model, args.output / "model.onnx", size, in_chans=in_chans)}')
    if args.format in ('torch', 'all'):
        print(f'torch.export: {export_torch(model, args.output / "model.pt2", size, in_chans=in_chans)}')
    return 0


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--checkpoint', required=True,
                   help='run folder, model folder (config.json + model.safetensors), or a weights file with --model')
    p.add_argument('--model', help='model name, needed when --checkpoint is a single weights file')
    p.add_argument('--use-ema', action='store_true', help='use the EMA weights of the checkpoint')


def build_parser() -> argparse.ArgumentParser:
    from .training import add_train_args
    parser = argparse.ArgumentParser(prog='conv2former', description=__doc__)
    parser.add_argument('--version', action='version', version=conv2former.__version__)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('train', help='train or fine-tune a model (torchrun for several processes)')
    add_train_args(p)
    p.set_defaults(func=_cmd_train, command='train')
    parser.train_parser = p

    p = sub.add_parser('validate', help='top-1/top-5, per-class accuracy and confusion matrix on a split')
    _add_checkpoint_args(p)
    p.add_argument('--data', help='ImageFolder tree, archive or timm source (default: the bundled dataset)')
    p.add_argument('--data-dir', help='root folder of a timm source')
    p.add_argument('--split', default='val', help="split folder (synonyms accepted; default 'val')")
    p.add_argument('--img-size', type=int)
    p.add_argument('--crop-pct', type=float)
    p.add_argument('--interpolation')
    p.add_argument('-b', '--batch-size', type=int, default=64)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--device')
    p.add_argument('--amp', nargs='?', const='bf16', choices=['bf16', 'fp16'])
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--strict', action='store_true', help='fail on unreadable images instead of skipping them')
    p.add_argument('--results-file', help='.json or .csv (default: <checkpoint folder>/validate_results.json)')
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser('predict', help='top-k labels for images')
    p.add_argument('images', nargs='+')
    _add_checkpoint_args(p)
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--device')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('info', help='params, MACs and feature strides/channels of registered models')
    p.add_argument('models', nargs='*', help='model names (default: every Conv2Former model)')
    p.add_argument('--img-size', type=int, default=224, help='input resolution for the MAC count (default 224)')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser('convert', help='upstream .pth/.pth.tar → model folder (safetensors + config.json)')
    p.add_argument('src')
    p.add_argument('--model', required=True, help='registered model name of the checkpoint')
    p.add_argument('--output', required=True, type=Path)
    p.add_argument('--model-kwargs', action='append', default=[], metavar='KEY=VALUE')
    p.add_argument('--labels', help='text file with one class name per line')
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('export', help='ONNX (checked with onnxruntime when installed) and torch.export')
    _add_checkpoint_args(p)
    p.add_argument('--output', required=True, type=Path)
    p.add_argument('--format', choices=['onnx', 'torch', 'all'], default='all')
    p.add_argument('--img-size', type=int)
    p.set_defaults(func=_cmd_export)

    from .tasks.cli import add_task_parsers
    parser.task_train_parsers = add_task_parsers(sub)

    from .analysis.cli import add_analyze_parser
    add_analyze_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    logging.getLogger('conv2former').setLevel(logging.INFO)
    try:
        if argv is None:
            argv = sys.argv[1:]
        if argv and argv[0] == 'train':  # recipes and --config become defaults of the train sub-parser
            from .training import parse_train_args
            args = parse_train_args(parser.train_parser, argv[1:])
        elif len(argv) > 1 and argv[0] in parser.task_train_parsers and argv[1] == 'train':
            from .tasks.cli import parse_task_train_args
            args = parse_task_train_args(parser.task_train_parsers[argv[0]], argv[0], argv[2:])
        else:
            args = parser.parse_args(argv)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear message, no traceback
        print(f'conv2former: error: {e}', file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .training import TrainingDiverged
        if isinstance(e, TrainingDiverged) or 'out of memory' in str(e):
            print(f'conv2former: error: {e}', file=sys.stderr)
            return 3
        raise


if __name__ == '__main__':
    sys.exit(main())
