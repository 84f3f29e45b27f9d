"""The ``conv2former`` command line: sub-parsers that build options and call the Python API or a task's commands.

``train | validate | predict | convert | export`` (classification), ``detect train|eval|predict`` and
``segment train|eval|predict`` (dense tasks), ``analyze erf|erf-compare|maps|cam``, ``sweep``, ``shards`` (WebDataset
shards from a dataset), ``info`` (model table)."""
import argparse
import json
import logging
import sys
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


def build_parser() -> argparse.ArgumentParser:
    from .tasks.classification.cli import add_parsers as add_classification
    from .tasks.detection.cli import add_parsers as add_detection
    from .tasks.segmentation.cli import add_parsers as add_segmentation
    from .analysis.cli import add_analyze_parser as add_analyze
    from .sweep.cli import add_parsers as add_sweep
    from .shards import add_shards_parser
    parser = argparse.ArgumentParser(prog='conv2former', description=__doc__)
    parser.add_argument('--version', action='version', version=conv2former.__version__)
    sub = parser.add_subparsers(dest='command', required=True)
    add_classification(sub)
    p = sub.add_parser('info', help='params, MACs and feature strides/channels of registered models')
    p.add_argument('models', nargs='*', help='model names (default: every Conv2Former model)')
    p.add_argument('--img-size', type=int, default=224, help='input resolution for the MAC count (default 224)')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.set_defaults(func=_cmd_info)
    add_detection(sub)
    add_segmentation(sub)
    add_analyze(sub)
    add_sweep(sub)
    add_shards_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    logging.getLogger('conv2former').setLevel(logging.INFO)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:  # bad input: one clear message, no traceback
        print(f'conv2former: error: {e}', file=sys.stderr)
        return 2
    except OSError as e:  # a write failed (fileio.StorageError names the path, the error and the last checkpoint)
        print(f'conv2former: error: {e}', file=sys.stderr)
        return 4
    except KeyboardInterrupt as e:  # training checkpoints first and says how to resume (engine.runtime.Interrupted)
        print(f'conv2former: {str(e) or "interrupted"}', file=sys.stderr)  # a bare Ctrl-C: str(e) == ''
        return 130
    except RuntimeError as e:
        from .engine import TrainingDiverged
        if isinstance(e, TrainingDiverged) or 'out of memory' in str(e):
            print(f'conv2former: error: {e}', file=sys.stderr)
            return 3
        raise


if __name__ == '__main__':
    sys.exit(main())
