"""Batched augmentation of the tensor data path: each RandAugment / colour-jitter op gives PIL's pixels, the batched
policy equals applying each image's own draws one by one, timm's policy parsing and refusals, and the PIL path's
guard against Pillow's 0-bit posterize error."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

from conv2former.tasks.classification import batch_augment as B
from conv2former.tasks.classification.data import allow_zero_bit_posterize

FILL = (124, 116, 104)


@pytest.fixture(scope='module')
def pixels() -> torch.Tensor:
    """4 smooth-ish RGB images (48 x 40) as float pixels in [0, 255], not square, so axes cannot be swapped."""
    torch.manual_seed(0)
    coarse = torch.rand(4, 3, 8, 8)
    return (torch.nn.functional.interpolate(coarse, size=(48, 40), mode='bilinear') * 255).round()


def _pil(pixels: torch.Tensor, name: str, arg, **kwargs) -> torch.Tensor:
    """timm's PIL op ``name`` on each image, back as float pixels."""
    out = []
    for image in pixels:
        img = Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8))
        img = timm_aa.NAME_TO_OP[name](img, *(() if arg is None else (arg,)), **kwargs)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float())
    return torch.stack(out)


@pytest.mark.parametrize('name,arg', [
    ('AutoContrast', None), ('Equalize', None), ('Invert', None), ('PosterizeIncreasing', 2), ('Solarize', 100),
    ('SolarizeAdd', 60), ('Color', 0.3), ('Color', 1.7), ('Contrast', 0.4), ('Contrast', 1.6), ('Brightness', 0.5),
    ('Brightness', 1.5), ('Sharpness', 0.2), ('Sharpness', 1.8)])
def test_pixel_ops_give_pils_pixels_exactly(pixels, name, arg):
    ours = B.PIXEL_OPS[name](pixels.clone(), [arg] * len(pixels))
    assert torch.equal(ours, _pil(pixels, name, arg)), (ours - _pil(pixels, name, arg)).abs().max()


@pytest.mark.parametrize('name,arg', [('Rotate', 20.0), ('Rotate', -30.0), ('ShearX', 0.2), ('ShearY', -0.25),
                                      ('TranslateXRel', 0.3), ('TranslateYRel', -0.2)])
def test_geometric_ops_match_pil_bilinear_away_from_the_border(pixels, name, arg):
    height, width = pixels.shape[2:]
    a, b, c, d, e, f = B._inverse_map(name, arg, height, width)
    ours = B.affine(pixels.clone(), [(a, b, c, d, e, f)] * len(pixels), torch.tensor(FILL, dtype=torch.float32))
    ours = ours.clamp(0, 255).floor()
    theirs = _pil(pixels, name, arg, fillcolor=FILL, resample=Image.BILINEAR)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing='ij')
    sx, sy = a * xs + b * ys + c, d * xs + e * ys + f
    inside = (sx >= 1.5) & (sx <= width - 1.5) & (sy >= 1.5) & (sy <= height - 1.5)
    outside = (sx < -1) | (sx > width + 1) | (sy < -1) | (sy > height + 1)
    assert inside.float().mean() > 0.5 and outside.any()
    diff = (ours - theirs).abs()
    assert diff[:, :, inside].max() <= 1 and diff[:, :, inside].mean() < 0.1  # off by one: float32 vs float64
    assert torch.equal(ours[:, :, outside], theirs[:, :, outside])  # the fill colour


def test_posterize_to_zero_bits_is_black_in_both_paths(pixels):
    assert torch.equal(B.posterize(pixels.clone(), [0] * 4), torch.zeros_like(pixels))
    from timm.data import create_transform
    img = Image.new('RGB', (40, 40), (100, 150, 200))
    # without the guard Pillow >= 12 raises in these draws (measured unguarded: 12, 20 and 6 times respectively)
    for policy, n in (('rand-m10-mstd0-inc1', 200), ('v0', 300), ('augmix-m9-mstd0.5', 300)):
        transform = allow_zero_bit_posterize(create_transform(32, is_training=True, auto_augment=policy))
        random.seed(0)
        np.random.seed(0)
        for _ in range(n):
            transform(img)


def test_batched_randaugment_equals_each_images_own_draws_applied_in_turn(pixels):
    aug = B.BatchRandAugment('rand-m9-mstd0.5-inc1', 40, (0.485, 0.456, 0.406))
    batch = pixels.repeat(6, 1, 1, 1)  # 24 images
    random.seed(1)
    np.random.seed(1)
    plans = aug.draw(len(batch))
    names = {name for plan in plans for name, _ in plan}
    assert len(names) >= 8 and {len(plan) for plan in plans} == {0, 1, 2}  # ops skip with probability 0.5
    random.seed(1)
    np.random.seed(1)
    batched = aug(batch.clone())
    for image, plan, result in zip(batch, plans, batched):
        x = image[None].clone()
        for name, arg in plan:
            if name in B.GEOMETRIC:
                x = B.affine(x, [B._inverse_map(name, arg, 48, 40)], aug.fill).clamp(0, 255).floor()
            else:
                x = B.PIXEL_OPS[name](x, [arg])
        assert torch.equal(result, x[0]), plan
    assert batched.min() >= 0 and batched.max() <= 255 and torch.equal(batched, batched.floor())


def test_colour_jitter_draws_per_image_factors_and_orders(pixels):
    batch = pixels.repeat(4, 1, 1, 1)
    torch.manual_seed(2)
    out = B.BatchColorJitter(0.4)(batch.clone())
    changed = (out != batch).flatten(1).any(1)
    assert changed.all() and len({tuple(o.flatten()[:50].tolist()) for o in out}) == len(out)
    torch.manual_seed(2)
    assert torch.equal(B.BatchColorJitter(0.4)(batch.clone()), out)
    assert torch.equal(B.BatchColorJitter(1e-9)(batch.clone()), batch)  # factors ~1: PIL's blend is the identity


def test_policies_the_batched_path_cannot_run_are_refused():
    with pytest.raises(ValueError, match="RandAugment policies \\('rand-...'\\), not 'augmix-m5'"):
        B.BatchRandAugment('augmix-m5', 32, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match='has no Desaturate, GaussianBlur'):
        B.BatchRandAugment('rand-m9-t3a', 32, (0.5, 0.5, 0.5))
    from conv2former.api import build_options
    with pytest.raises(ValueError, match='augmix'):
        build_options('classification', dict(data='x', data_cache=True, aa='augmix-m5'))
    for typo in ('randm9', 'rand-q7', 'v9'):  # refused for both paths when the options are built, not mid-epoch
        with pytest.raises(ValueError, match=f"--aa '{typo}' is not a timm auto-augment policy"):
            build_options('classification', dict(data='x', aa=typo))
    opts = build_options('classification', dict(data='x', data_cache=True, recipe='in1k'))  # the paper's recipe
    assert opts.aa == 'rand-m9-mstd0.5-inc1' and opts.reprob > 0


def test_batch_augment_with_randaugment_and_erasing_on_a_uint8_batch():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = B.BatchAugment(24, scale=(0.3, 1.0), aa='rand-m9-mstd0.5-inc1', re_prob=0.25)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    out = aug(images)
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert isinstance(aug.colour, B.BatchRandAugment)
    assert isinstance(B.BatchAugment(24, color_jitter=0.4).colour, B.BatchColorJitter)
    assert B.BatchAugment(24, aa='rand-m9', color_jitter=0.4).colour.__class__ is B.BatchRandAugment  # as timm


def test_the_accelerator_path_runs_end_to_end_and_agrees_with_the_cpu_path():
    """``resample='grid'`` is what a GPU runs (one grid_sample, then the same RandAugment / erasing code): on the CPU
    with the same seeds it gives the CPU path's result up to the CPU path's rounding before RandAugment."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    outs = {}
    for resample in ('per-image', 'grid'):
        torch.manual_seed(0)
        outs[resample] = B.BatchAugment(24, scale=(0.3, 1.0), resample=resample)(images)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert ((outs['grid'] - outs['per-image']) * std * 255).abs().max() <= 1 + 1e-3
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    full = B.BatchAugment(24, scale=(0.3, 1.0), aa='rand-m9-mstd0.5-inc1', re_prob=0.5, resample='grid')(images)
    assert full.shape == (8, 3, 24, 24) and torch.isfinite(full).all()
    with pytest.raises(ValueError, match="resample must be"):
        B.BatchAugment(24, resample='bilinear')
