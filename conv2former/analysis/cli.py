"""``conv2former analyze erf | erf-compare | maps | cam``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ['add_analyze_parser', 'run_erf', 'run_erf_compare', 'run_maps', 'run_cam']


def _model(args: argparse.Namespace):
    from .common import load_analysis_model
    kwargs = {}
    for kv in args.model_kwargs:
        kwargs.update(kv)
    return load_analysis_model(args.model, args.checkpoint, kwargs, use_ema=args.use_ema,
                               device=args.device or 'cpu')


def _images(args: argparse.Namespace):
    from .common import select_images
    return select_images(args.images, args.data, args.split, args.num_images)


def _header(am, args: argparse.Namespace, img_size: int) -> dict:
    return dict(model=am.name, checkpoint=am.checkpoint, model_kwargs=am.model_kwargs, img_size=img_size,
                data=str(args.data) if args.data else ('images' if args.images else 'bundled'))


def run_erf(args: argparse.Namespace) -> int:
    """Average ERF of one stage over images; writes erf.json, erf.npy and erf.png."""
    from .common import StageOutput, check_img_size, resolve_stage, write_json
    from .erf import area_ratios, erf_map, plot_erf
    am = _model(args)
    stage, info = resolve_stage(am.model, args.stage)
    check_img_size(am.model, args.img_size, am.name)
    images = _images(args)
    erf = erf_map(StageOutput(am.model, info['module']), images, am.data_config, args.img_size,
                  batch_size=args.batch_size, device=args.device or 'cpu', progress=args.progress)
    ratios, sides = area_ratios(erf)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / 'erf.npy', erf.astype(np.float32))
    result = dict(_header(am, args, args.img_size), num_images=len(images), stage=stage,
                  stage_module=info['module'], stage_stride=info['reduction'], area_ratio=ratios, side=sides)
    write_json(out / 'erf.json', result)
    plot_erf(erf, out / 'erf.png', f'{am.name} stage {stage} ERF ({len(images)} images)')
    print('area ratio  ' + '  '.join(f'{t}: {r:.4f} ({sides[t]} px)' for t, r in ratios.items()))
    print(f'wrote {out / "erf.json"}, {out / "erf.png"}, {out / "erf.npy"}')
    return 0


def run_erf_compare(args: argparse.Namespace) -> int:
    """Side-by-side ERFs of several `analyze erf` folders, with a markdown table of their area ratios."""
    from .erf import plot_erf_grid, ratio_table
    dirs = [Path(d) for d in args.dirs]
    labels = args.labels or [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise ValueError(f'--labels needs one label per folder: {len(dirs)} folders, {len(labels)} labels')
    rows, maps = [], []
    for d, label in zip(dirs, labels):
        for name in ('erf.json', 'erf.npy'):
            if not (d / name).is_file():
                raise FileNotFoundError(f'{d / name} not found: give folders written by `conv2former analyze erf`')
        rows.append((label, json.loads((d / 'erf.json').read_text())))
        maps.append(np.load(d / 'erf.npy', allow_pickle=False))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    titles = [f'{label}\nr(0.2)={r["area_ratio"]["0.2"]:.3f}  r(0.5)={r["area_ratio"]["0.5"]:.3f}'
              for label, r in rows]
    png = plot_erf_grid(maps, titles, out / 'erf_compare.png')
    table = ratio_table(rows)
    (out / 'erf_compare.md').write_text(table)
    print(table + f'wrote {png}, {out / "erf_compare.md"}')
    return 0


def run_maps(args: argparse.Namespace) -> int:
    """Modulation maps A of chosen Conv2Former blocks on images; writes maps.png and maps.json."""
    from .common import check_img_size, write_json
    from .maps import modulation_blocks, modulation_maps, plot_maps, select_blocks
    am = _model(args)
    blocks = select_blocks(modulation_blocks(am.model), args.blocks)
    img_size = args.img_size or am.data_config['input_size'][-1]
    check_img_size(am.model, img_size, am.name)
    results = modulation_maps(am.model, blocks, _images(args), am.data_config, img_size,
                              top_channels=args.top_channels, device=args.device or 'cpu', progress=args.progress)
    out = Path(args.output)
    png = plot_maps(results, out / 'maps.png', am.label)
    per_image = []
    for r in results:
        pred = int(r['logits'].argmax())
        per_image.append(dict(image=str(r['image']), predicted=dict(index=pred, label=am.label(pred)), blocks=[
            dict(block=b['block'].name, stage=b['block'].stage, index=b['block'].index, shape=list(b['a'].shape),
                 mean_abs=float(b['a'].abs().mean()),
                 top_channels=[dict(channel=c, mean_abs=s) for c, s in zip(b['top'], b['top_strength'])])
            for b in r['blocks']]))
    write_json(out / 'maps.json', dict(_header(am, args, img_size), blocks=[b.name for b in blocks],
                                       images=per_image))
    print(f'wrote {png}, {out / "maps.json"}')
    return 0


def run_cam(args: argparse.Namespace) -> int:
    """Class activation maps (pytorch-grad-cam) on a stage's output; writes cam.png and cam.json."""
    from .cam import cam_class, cam_stats, class_activation_maps, plot_cams, resolve_class
    from .common import check_img_size, resolve_stage, write_json
    for m in args.methods:
        cam_class(m)  # fail early when the package is missing
    am = _model(args)
    stage, info = resolve_stage(am.model, args.stage)
    img_size = args.img_size or am.data_config['input_size'][-1]
    check_img_size(am.model, img_size, am.name)
    num_classes = getattr(am.model, 'num_classes', 0)
    if not num_classes:
        raise ValueError(f'{am.name} has no classifier (num_classes=0): class activation maps need one')
    target = resolve_class(args.target_class, am.class_names, num_classes)
    results = class_activation_maps(am.model, am.model.get_submodule(info['module']), _images(args),
                                    am.data_config, img_size, args.methods, target=target, progress=args.progress)
    out = Path(args.output)
    png = plot_cams(results, out / 'cam.png', am.label)
    per_image = []
    for r in results:
        pred = int(r['probs'].argmax())
        per_image.append(dict(
            image=str(r['image']), predicted=dict(index=pred, label=am.label(pred), prob=float(r['probs'][pred])),
            target=dict(index=r['target'], label=am.label(r['target'])),
            cams={m: cam_stats(c) for m, c in r['cams'].items()}))
    write_json(out / 'cam.json', dict(_header(am, args, img_size), stage=stage, stage_module=info['module'],
                                      methods=list(args.methods), images=per_image))
    print(f'wrote {png}, {out / "cam.json"}')
    return 0


def _add_common(p: argparse.ArgumentParser, num_images: int, output: str, images: bool = True) -> None:
    from ..engine.options import add_keywords_argument
    g = p.add_argument_group('model')
    g.add_argument('--model', help='registered model name (alone: random initialisation)')
    add_keywords_argument(g, default=[], help='constructor kwargs, values as YAML (kernel_size=21 depths=[1,1,3,1])')
    g.add_argument('--checkpoint', help='run folder, model folder, .safetensors or upstream .pth (with --model)')
    g.add_argument('--use-ema', action='store_true', help='use the EMA weights of the checkpoint')
    g.add_argument('--device', help="'cpu', 'cuda', ... (default cpu)")
    g = p.add_argument_group('images')
    if images:
        g.add_argument('images', nargs='*', help='image files (default: images from --data)')
    g.add_argument('--data', help='ImageFolder tree or archive (default: the bundled dataset)')
    g.add_argument('--split', default='val', help="split of --data (default 'val')")
    g.add_argument('--num-images', type=int, default=num_images,
                   help=f'images taken from --data, spread over its classes (default {num_images})')
    p.add_argument('--output', default=output, help=f'output folder (default {output})')
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` with its sub-commands to the ``conv2former`` sub-parsers."""
    p = subparsers.add_parser('analyze', help='effective receptive fields, modulation maps, class activation maps')
    sub = p.add_subparsers(dest='analysis', required=True)

    q = sub.add_parser('erf', help='effective receptive field of a stage (RepLKNet method): erf.json/.png/.npy')
    _add_common(q, 50, 'analysis/erf')
    q.add_argument('--img-size', type=int, default=1024, help='input resolution (default 1024)')
    q.add_argument('--stage', type=int, help='stage whose centre output is traced (default: the last)')
    q.add_argument('-b', '--batch-size', type=int, default=4)
    q.set_defaults(func=run_erf)

    q = sub.add_parser('erf-compare', help='several `analyze erf` results side by side, with a ratio table')
    q.add_argument('dirs', nargs='+', help='folders written by `analyze erf`')
    q.add_argument('--labels', nargs='+', help='one label per folder (default: folder names)')
    q.add_argument('--output', default='analysis/erf-compare', help='output folder (default analysis/erf-compare)')
    q.set_defaults(func=run_erf_compare)

    q = sub.add_parser('maps', help='modulation maps A of Conv2Former blocks overlaid on images')
    _add_common(q, 4, 'analysis/maps')
    q.add_argument('--img-size', type=int, help="input resolution (default: the model's)")
    q.add_argument('--blocks', nargs='+', metavar='STAGE[.BLOCK]',
                   help='blocks to show, e.g. 0.0 3.-1 (default: the last block of every stage)')
    q.add_argument('--top-channels', type=int, default=3, help='strongest channels shown per block (default 3)')
    q.set_defaults(func=run_maps)

    q = sub.add_parser('cam', help='class activation maps (pytorch-grad-cam) on a stage')
    _add_common(q, 4, 'analysis/cam')
    q.add_argument('--img-size', type=int, help="input resolution (default: the model's)")
    q.add_argument('--stage', type=int, help='target stage (default: the last)')
    q.add_argument('--methods', nargs='+', default=['gradcam'], choices=['gradcam', 'gradcam++', 'eigencam'])
    q.add_argument('--target-class', help='class index or name (default: the predicted class)')
    q.set_defaults(func=run_cam)
    return p
