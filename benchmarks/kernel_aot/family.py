"""The shapes the kernels are compiled for: the Conv2Former family's stages, the target GPUs, the selections.

``Case`` is one (model, stage, batch) shape, ``Selection`` what one report run covers (``quick_selection``: the C2F-T
stage-1 reference at k=11; ``full_selection``: everything), ``make_tensors`` the meta tensors a launcher gets.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ['MODELS', 'MAPS', 'BATCHES', 'KERNEL_SIZES', 'DTYPES', 'LAYOUTS', 'REFERENCE', 'Arch', 'ARCHS',
           'H100_BANDWIDTH', 'CUDNN_MS', 'Case', 'Selection', 'QUICK_VARIANTS', 'quick_selection', 'full_selection',
           'Tensors', 'make_tensors']

MODELS = {'N': (64, 128, 256, 512), 'T': (72, 144, 288, 576), 'S': (72, 144, 288, 576), 'B': (96, 192, 384, 768),
          'L': (128, 256, 512, 1024)}  # channels per stage; T and S differ in depth only
MAPS = (56, 28, 14, 7)  # stage feature maps at 224 px
BATCHES = (1, 128)
KERNEL_SIZES = tuple(range(3, 32, 2))
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
LAYOUTS = ('NCHW', 'channels_last')
REFERENCE = dict(model='T', stage=1, batch=128, kernel_size=11)  # C2F-T stage 1: 128x72x56x56, k=11


@dataclasses.dataclass(frozen=True)
class Arch:
    """The per-SM limits of one compute capability (the occupancy model of ``compiling.occupancy``)."""
    cc: int
    gpu: str
    sms: int
    smem_per_sm: int
    smem_per_block: int
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reg_unit: int = 256  # registers per warp, allocation unit
    smem_unit: int = 128
    smem_reserved: int = 1024  # per block, by the CUDA runtime
    sub_partitions: int = 4


ARCHS = {90: Arch(90, 'H100 SXM', 132, 228 * 1024, 227 * 1024), 80: Arch(80, 'A100', 108, 164 * 1024, 163 * 1024)}
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
CUDNN_MS = {  # /work/shared/docs/performance-baseline.md: bf16, 128x72x56x56, k=11, H100
    'channels_last': dict(fwd=4.83, fwd_bwd=15.7), 'NCHW': dict(fwd=1.99, fwd_bwd=9.4)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One (model, stage, batch) shape."""
    model: str
    stage: int
    batch: int

    @property
    def channels(self) -> int:
        return MODELS[self.model][self.stage - 1]

    @property
    def size(self) -> int:
        return MAPS[self.stage - 1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.channels, self.size, self.size

    @property
    def label(self) -> str:
        return f'{self.model}{self.stage}@{self.batch}'


@dataclasses.dataclass
class Selection:
    models: tuple = tuple(MODELS)
    stages: tuple = (1, 2, 3, 4)
    batches: tuple = BATCHES
    kernel_sizes: tuple = KERNEL_SIZES
    dtypes: tuple = tuple(DTYPES)
    layouts: tuple = LAYOUTS
    variants: tuple = ('*',)  # fnmatch patterns on variant names
    tiles: tuple = ()  # hand-passed TileConfig tuples, besides the heuristic's
    heuristic: bool = True  # the tile heuristic's choice (tile=None)

    def cases(self) -> list[Case]:
        return [Case(m, s, b) for m in self.models for s in self.stages for b in self.batches]

    def describe(self) -> str:
        tiles = (['heuristic'] if self.heuristic else []) + ['x'.join(map(str, t[:3])) + f'/{t[3]}' for t in self.tiles]
        variants = 'all' if self.variants == ('*',) else ', '.join(self.variants)
        return (f"models {','.join(self.models)}, stages {','.join(map(str, self.stages))}, batches "
                f"{','.join(map(str, self.batches))}, k {k_range(list(self.kernel_sizes))}, dtypes "
                f"{','.join(self.dtypes)}, layouts {','.join(self.layouts)}, tiles {', '.join(tiles)}, "
                f"variants {variants}")


def k_range(ks: list) -> str:
    """'3–31 (15)' for a full odd range, else the list."""
    ks = sorted(set(k for k in ks if k is not None))
    if not ks:
        return '—'
    if len(ks) > 2 and ks == list(range(ks[0], ks[-1] + 1, 2)):
        return f'{ks[0]}–{ks[-1]} ({len(ks)})'
    return ','.join(map(str, ks))


QUICK_VARIANTS = ('dwconv.fwd bias', 'dwconv.dgrad', 'dwconv.wgrad', 'dwconv.wgrad act',
                  'convmod.fwd act mul none bias', 'convmod.fwd act mul sigmoid bias',
                  'convmod.grad_pre act mul none bias pre+dv', 'convmod.grad_pre act mul sigmoid bias pre+dv',
                  'convmod.dgrad act')


def quick_selection(layouts: tuple = ('channels_last',)) -> Selection:
    """The C2F-T stage-1 shape at k=11, the representative variants, all dtypes, the heuristic's tile."""
    return Selection(models=(REFERENCE['model'],), stages=(REFERENCE['stage'],), batches=(REFERENCE['batch'],),
                     kernel_sizes=(REFERENCE['kernel_size'],), layouts=layouts, variants=QUICK_VARIANTS)


def full_selection() -> Selection:
    return Selection()


@dataclasses.dataclass(frozen=True)
class Tensors:
    """Meta tensors of one (shape, layout, dtype, k): x/a the input, v the value, g/dy an output gradient."""
    x: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    k: int


def make_tensors(shape: tuple[int, int, int, int], layout: str, dtype: torch.dtype, k: int) -> Tensors:
    """Meta tensors of ``shape`` (B, C, H, W) in ``layout`` ('NCHW' or 'channels_last'), a (C, 1, k, k) weight."""
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format

    def act():
        return torch.empty(shape, dtype=dtype, device='meta', memory_format=fmt)

    channels = shape[1]
    return Tensors(act(), act(), act(), torch.empty(channels, 1, k, k, dtype=dtype, device='meta'),
                   torch.empty(channels, dtype=dtype, device='meta'), k)
