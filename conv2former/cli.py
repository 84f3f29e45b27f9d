"""``conv2former`` command line."""
import argparse
import json
import sys
from typing import List, Optional

import timm

import conv2former
from .info import model_info


def _cmd_info(args: argparse.Namespace) -> int:
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
    parser = argparse.ArgumentParser(prog='conv2former', description=__doc__)
    parser.add_argument('--version', action='version', version=conv2former.__version__)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('info', help='params, MACs and feature strides/channels of registered models')
    p.add_argument('models', nargs='*', help='model names (default: every Conv2Former model)')
    p.add_argument('--img-size', type=int, default=224, help='input resolution for the MAC count (default 224)')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f'conv2former {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
