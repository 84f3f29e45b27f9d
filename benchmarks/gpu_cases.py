"""What benchmarks/gpu_check times: the kernel cases in priority order, the tile candidates, the roofline."""
from __future__ import annotations

import argparse

from .bench_dwconv import traffic

__all__ = ['STAGES', 'ODD_SHAPES', 'KERNEL_SIZES', 'OWN_K', 'LAYOUTS', 'TILES', 'kernel_cases', 'case_key',
           'fused_cases', 'clamp_tile', 'default_tile', 'candidates', 'tile_label', 'roofline']

STAGES = {'N': ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)),
          'T': ((72, 56, 56), (144, 28, 28), (288, 14, 14), (576, 7, 7))}
ODD_SHAPES = ((72, 57, 55), (33, 13, 9))  # odd H and W; C not a multiple of the channel block, H, W < 21
KERNEL_SIZES = (11, 7, 21)  # in priority order
OWN_K = {'N': 7, 'T': 11}
LAYOUTS = ('channels_last', 'NCHW')
# Tile candidates (BLOCK_C, BLOCK_H, BLOCK_W, num_warps) per layout besides the heuristic's; clamped to the shape.
TILES = {'channels_last': ((64, 4, 4, 4), (32, 8, 8, 8), (16, 4, 16, 4)),
         'NCHW': ((2, 16, 32, 4), (4, 8, 64, 8), (8, 4, 32, 4))}


def kernel_cases(args: argparse.Namespace) -> list[dict]:
    """(shape, k, layout) in priority order: each model's own k on its stages first, then the other k's, odd shapes
    last; a shape shared by N and T is listed once."""
    cases, seen = [], set()
    stage_shapes = [(model, shape) for model in ('T', 'N') for shape in args.stages[model]]
    passes = [[(m, s, args.own_k[m]) for m, s in stage_shapes]]
    passes.append([(m, s, k) for k in args.kernels for m, s in stage_shapes if k != args.own_k[m]])
    passes.append([('odd', s, k) for k in args.kernels for s in args.odd])
    for model, shape, k in (item for group in passes for item in group):
        for layout in LAYOUTS:
            if (shape, k, layout) not in seen:
                seen.add((shape, k, layout))
                cases.append(dict(model=model, C=shape[0], H=shape[1], W=shape[2], k=k, layout=layout))
    return cases


def case_key(case: dict, dtype: str = 'bf16') -> str:
    return f"k{case['k']} {case['C']}x{case['H']}x{case['W']} {case['layout']} {dtype}"


def clamp_tile(tile: tuple, case: dict):
    """A candidate tile shrunk to the next powers of two of the case's C, H, W (as the heuristic does)."""
    from conv2former.ops.launch import TileConfig, next_pow2

    block_c, block_h, block_w, warps = tile
    return TileConfig(min(block_c, next_pow2(case['C'])), min(block_h, next_pow2(case['H'])),
                      min(block_w, next_pow2(case['W'])), warps)


def default_tile(case: dict):
    """The launchers' own tile for the case (tile heuristic and warps)."""
    from conv2former.ops.launch import heuristic_tile

    return heuristic_tile(case['C'], case['H'], case['W'], case['layout'] == 'channels_last')


def candidates(case: dict, n: int | None) -> list:
    """The tiles tuned for ``case``: the heuristic's, then the first ``n`` of TILES clamped to the shape."""
    tiles = [default_tile(case)] + [clamp_tile(t, case) for t in TILES[case['layout']][:n]]
    return list(dict.fromkeys(tiles))  # clamping can make two the same


def fused_cases(args: argparse.Namespace, cases: list[dict]) -> list[dict]:
    """The cases the fused modulation is timed on: each model's stages at its own k."""
    return [case for case in cases if case['model'] in OWN_K and case['k'] == args.own_k[case['model']]]


def tile_label(tile) -> str:
    return 'x'.join(map(str, tile[:3])) + f'/w{tile.num_warps}'


def roofline(case: dict, batch: int, mode: str, ms: float, peaks: tuple[float, float]) -> dict:
    """GB/s and the ratio of ``ms`` to max(bytes / peak B/s, MACs / peak MAC/s) for a bf16 ``mode`` pass."""
    n_bytes, macs = traffic(batch, case['C'], case['H'], case['W'], case['k'], 2, mode)
    floor_ms = 1e3 * max(n_bytes / peaks[0], macs / peaks[1])
    return dict(gbps=round(n_bytes / ms / 1e6, 1), roofline_ms=floor_ms, roofline_ratio=round(ms / floor_ms, 2))
