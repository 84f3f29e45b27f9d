"""Training augmentation of whole uint8 batches on their device, for the tensor-resident data path (``--data-cache``).

``BatchAugment`` does what timm's PIL training transform does, in the same order and with the same random choices
per image, but over a batch at once: random-resized-crop + horizontal flip (one bilinear resampling per image), then
either RandAugment (timm's ``rand-...`` policies) or colour jitter (timm turns colour jitter off when an auto-augment
policy is on), normalisation, and random erasing (timm's ``RandomErasing``, on the normalised batch as timm's GPU
prefetcher applies it).

RandAugment is timm's own policy object: it parses the policy string and draws, per image, the ops, whether each
applies and its magnitude (NumPy and Python ``random``, as in timm), but instead of the PIL image functions each op
runs vectorised over the images that drew it (all geometric ops of one position in one resampling), on float pixels
in [0, 255] truncated to integers after every op as PIL's uint8 images are. The ops follow PIL's definitions
(``ImageOps`` / ``ImageEnhance`` / affine ``transform`` with the dataset-mean fill) and give PIL's pixels exactly
(tested), except: geometric ops interpolate bilinearly (timm draws bilinear or bicubic; off by at most one grey
level inside the image), pixels within a pixel of the image border blend with the fill colour, and Posterize to
0 bits gives black (Pillow >= 12 refuses 0 bits, which timm's 'inc1' policies can draw). All randomness comes from
the global generators, which the engine seeds per batch, so a resumed run repeats its augmentation exactly.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ['BatchAugment', 'BatchColorJitter', 'BatchRandAugment']

GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel')
_GREY = (0.299, 0.587, 0.114)  # PIL's RGB -> L weights


def _per_image(values, like: torch.Tensor) -> torch.Tensor:
    """(n, 1, 1, 1) tensor of one value per image, on ``like``'s device."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) luminance, rounded as PIL's ``convert('L')``."""
    weights = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True).round()


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageEnhance``: ``degenerate + factor * (x - degenerate)`` clipped to [0, 255] and truncated to an
    integer as PIL's ``Image.blend`` does (factor per image)."""
    return (x - degenerate).mul_(factor).add_(degenerate).clamp_(0, 255).floor_()  # in place: memory-bound


def brightness(x, factors):
    return blend(torch.zeros_like(x), x, _per_image(factors, x))


def contrast(x, factors):
    mean = _grey(x).mean((1, 2, 3), keepdim=True).round()  # PIL: int(mean of L + 0.5)
    return blend(mean.expand_as(x), x, _per_image(factors, x))


def color(x, factors):
    return blend(_grey(x).expand_as(x), x, _per_image(factors, x))


def sharpness(x, factors):
    """PIL's SMOOTH filter (3 x 3, centre 5, sum 13) as the degenerate image; border pixels stay unsmoothed. The
    3 x 3 sum is taken by shifted adds (exact on integer pixels, ~8x faster than a grouped conv2d on the CPU)."""
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = ((box + 4 * x[:, :, 1:-1, 1:-1]) / 13).round()
    return blend(smooth, x, _per_image(factors, x))


def auto_contrast(x, _):
    """PIL ``ImageOps.autocontrast``: each channel stretched to [0, 255], with PIL's float64 arithmetic (its scale
    and offset computed in Python, as PIL does: a vectorised division rounds differently)."""
    low, high = x.amin((2, 3)).tolist(), x.amax((2, 3)).tolist()
    scale = [[255.0 / (h - lo) if h > lo else 1.0 for lo, h in zip(*pair)] for pair in zip(low, high)]
    offset = [[-lo * k if h > lo else 0.0 for lo, h, k in zip(*row)] for row in zip(low, high, scale)]
    as_tensor = partial(torch.tensor, dtype=torch.float64, device=x.device)
    stretched = x.double() * as_tensor(scale).view(-1, 3, 1, 1) + as_tensor(offset).view(-1, 3, 1, 1)
    return stretched.floor().clamp(0, 255).to(x.dtype)


def equalize(x, _):
    from torchvision.transforms.v2.functional import equalize as tv_equalize  # per-image histograms, PIL's rule
    return tv_equalize(x.to(torch.uint8)).to(x.dtype)


def invert(x, _):
    return 255 - x


def posterize(x, bits):
    keep = _per_image(bits, x).clamp(max=8)
    step = 2 ** (8 - keep)
    return (x / step).floor() * step


def solarize(x, thresholds):
    return torch.where(x >= _per_image(thresholds, x), 255 - x, x)


def solarize_add(x, adds, threshold=128):
    return torch.where(x < threshold, (x + _per_image(adds, x)).clamp(max=255), x)


PIXEL_OPS = {
    'AutoContrast': auto_contrast, 'Equalize': equalize, 'Invert': invert,
    'Posterize': posterize, 'PosterizeIncreasing': posterize, 'PosterizeOriginal': posterize,
    'Solarize': solarize, 'SolarizeIncreasing': solarize, 'SolarizeAdd': solarize_add,
    'Color': color, 'ColorIncreasing': color, 'Contrast': contrast, 'ContrastIncreasing': contrast,
    'Brightness': brightness, 'BrightnessIncreasing': brightness,
    'Sharpness': sharpness, 'SharpnessIncreasing': sharpness,
}


def _inverse_map(name: str, value: float, height: int, width: int) -> tuple:
    """PIL's affine data (a, b, c, d, e, f): output (x, y) samples input (a x + b y + c, d x + e y + f), in pixel
    units with pixel centres at i + 0.5, for timm's geometric op ``name`` with argument ``value``."""
    if name == 'Rotate':  # PIL ``rotate``: counter-clockwise by ``value`` degrees about the image centre
        a = -math.radians(value)
        cos, sin, cx, cy = math.cos(a), math.sin(a), width / 2, height / 2
        return cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy
    if name == 'ShearX':
        return 1, value, 0, 0, 1, 0
    if name == 'ShearY':
        return 1, 0, 0, value, 1, 0
    dx = value * width if name == 'TranslateXRel' else value if name == 'TranslateX' else 0
    dy = value * height if name == 'TranslateYRel' else value if name == 'TranslateY' else 0
    return 1, 0, dx, 0, 1, dy


def affine(x: torch.Tensor, maps: Sequence[tuple], fill: torch.Tensor) -> torch.Tensor:
    """Each image resampled (bilinear) through its PIL-style affine map; outside the image: ``fill`` (per channel)."""
    n, _, height, width = x.shape
    a, b, c, d, e, f = torch.tensor(maps, dtype=x.dtype, device=x.device).view(n, 6, 1, 1).unbind(1)
    cols = (torch.arange(width, dtype=x.dtype, device=x.device) + 0.5).view(1, 1, width)
    rows = (torch.arange(height, dtype=x.dtype, device=x.device) + 0.5).view(1, height, 1)
    # input pixel coordinates of every output pixel, in grid_sample's units (align_corners=False)
    grid = torch.stack([(a * cols + b * rows + c) * (2 / width) - 1, (d * cols + e * rows + f) * (2 / height) - 1], -1)
    fill = fill.to(x.device, x.dtype).view(1, 3, 1, 1)
    return F.grid_sample(x - fill, grid, mode='bilinear', padding_mode='zeros', align_corners=False) + fill


def _by_op(plans: list, position: int) -> dict:
    """{op: [(image index, argument), ...]} of the images whose plan has a step at ``position``."""
    groups = {}
    for i, plan in enumerate(plans):
        if position < len(plan):
            op, arg = plan[position]
            groups.setdefault(op, []).append((i, arg))
    return groups


def _apply_each(x: torch.Tensor, uses: list, op) -> None:
    """``op(images, arguments)`` over the images ``uses`` names ((index, argument) pairs), written back into ``x``."""
    index = torch.tensor([i for i, _ in uses], device=x.device)
    x.index_copy_(0, index, op(x.index_select(0, index), [arg for _, arg in uses]))


class BatchRandAugment:
    """timm's RandAugment policy ``config`` (e.g. ``rand-m9-mstd0.5-inc1``) applied per image, run op by op over the
    images that drew each op. ``img_size`` and ``mean`` set timm's hparams (translate_const, fill colour)."""

    def __init__(self, config: str, img_size: int, mean: Sequence[float]):
        from timm.data.auto_augment import rand_augment_transform
        if not config.startswith('rand'):
            raise ValueError(f"--data-cache runs RandAugment policies ('rand-...'), not {config!r}: use --aa "
                             f"rand-m9-mstd0.5-inc1 (the paper's), or drop --data-cache")
        fill = tuple(min(255, round(255 * m)) for m in mean)
        self.policy = rand_augment_transform(config, dict(translate_const=int(img_size * 0.45), img_mean=fill))
        unknown = sorted({op.name for op in self.policy.ops} - set(PIXEL_OPS) - set(GEOMETRIC))
        if unknown:
            raise ValueError(f'--aa {config}: the batched RandAugment has no {", ".join(unknown)}; use a policy '
                             f'without them (e.g. rand-m9-mstd0.5-inc1) or drop --data-cache')
        for op in self.policy.ops:  # timm draws as usual; the "image" is the list of ops applied so far
            op.aug_fn = partial(self._record, op.name)
        self.fill = torch.tensor(fill, dtype=torch.float32)

    @staticmethod
    def _record(name, applied, *args, **_):
        return applied + [(name, args[0] if args else None)]

    def draw(self, n: int) -> list:
        """Per image, the (op name, argument) pairs it gets, in order, drawn exactly as timm draws them."""
        return [self.policy([]) for _ in range(n)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixels (B, 3, H, W) in [0, 255] -> augmented (in place), truncated to integers as PIL does."""
        plans = self.draw(len(x))
        height, width = x.shape[2:]
        for position in range(max(map(len, plans), default=0)):
            groups = _by_op(plans, position)
            # the geometric ops of all images at this position go in one resampling
            moved = [(i, _inverse_map(name, arg, height, width))
                     for name in GEOMETRIC for i, arg in groups.pop(name, [])]
            if moved:
                _apply_each(x, moved, lambda images, maps: affine(images, maps, self.fill).clamp_(0, 255).floor_())
            for name, uses in groups.items():
                _apply_each(x, uses, PIXEL_OPS[name])
        return x


class BatchColorJitter:
    """torchvision's ``ColorJitter(brightness, contrast, saturation)`` per image (random order, factors drawn from
    torch's generator as torchvision draws them), run op by op over the images at each position."""

    def __init__(self, strength: float):
        self.range = (max(0.0, 1 - strength), 1 + strength)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ops = (brightness, contrast, color, None)  # torchvision's fn_idx order; index 3 (hue) is off
        plans = []
        for _ in range(len(x)):
            order = torch.randperm(4).tolist()
            factors = [float(torch.empty(1).uniform_(*self.range)) for _ in range(3)]
            plans.append([(ops[k], factors[k]) for k in order if k < 3])
        for position in range(3):
            for op, uses in _by_op(plans, position).items():
                _apply_each(x, uses, op)
        return x


class BatchAugment:
    """Random-resized-crop + horizontal flip, then RandAugment (``aa``) or colour jitter, normalisation and random
    erasing (``re_prob``), of a uint8 (B, 3, H, W) batch on its device. Each crop box (integer pixels, drawn as
    torchvision's ``RandomResizedCrop`` draws them) is resized to ``size`` x ``size`` by bilinear interpolation
    (``align_corners=False``, no antialiasing), then flipped with probability ``hflip``. Parameters come from the
    global generators (seeded by the engine), so both devices draw the same boxes.

    Two implementations of the same resampling: on the CPU each crop is resized by ``F.interpolate`` on its uint8
    channels-last view (torch's vectorised uint8 kernel; ~5x faster than one batched ``grid_sample`` in float on
    two cores); on an accelerator one batched ``grid_sample`` over per-image sampling grids, clamped to the crop box
    as ``F.interpolate`` clamps. They agree up to the CPU path's rounding to uint8 (<= 1 grey level). ``resample``
    'auto' picks by device; 'per-image' / 'grid' force one (tests run the accelerator path on the CPU)."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), re_prob: float = 0.0,
                 aa: Optional[str] = None, color_jitter: float = 0.0, resample: str = 'auto'):
        if resample not in ('auto', 'per-image', 'grid'):
            raise ValueError(f"resample must be 'auto', 'per-image' or 'grid', got {resample!r}")
        self.size, self.scale, self.hflip, self.re_prob = size, tuple(scale), hflip, re_prob
        self.resample = resample
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        # as timm's create_transform: an auto-augment policy turns colour jitter off
        self.colour = BatchRandAugment(aa, size, mean) if aa else \
            BatchColorJitter(color_jitter) if color_jitter > 0 else None

    def boxes(self, batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4) int64 crop boxes (x0, y0, w, h) inside the image, one try per image then clamped (torchvision
        retries up to 10 times first), and (B,) bool flips."""
        area = torch.empty(batch).uniform_(*self.scale) * height * width
        ratio = torch.exp(torch.empty(batch).uniform_(*self.log_ratio))
        w = torch.sqrt(area * ratio).round().clamp(1, width)
        h = torch.sqrt(area / ratio).round().clamp(1, height)
        x0 = (torch.rand(batch) * (width - w + 1)).floor().clamp(max=width - w)
        y0 = (torch.rand(batch) * (height - h + 1)).floor().clamp(max=height - h)
        flips = torch.rand(batch) < self.hflip
        return torch.stack([x0, y0, w, h], 1).long(), flips

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'BatchAugment expects a uint8 (B, 3, H, W) batch, got {images.dtype} '
                             f'{tuple(images.shape)}')
        boxes, flips = self.boxes(images.shape[0], images.shape[2], images.shape[3])
        per_image = images.device.type == 'cpu' if self.resample == 'auto' else self.resample == 'per-image'
        if per_image:
            pixels = self.resize_each(images, boxes, flips).float()
        else:
            pixels = self.resample_grid(images, boxes, flips)
        if self.colour is not None:
            pixels = self.colour(pixels)
        scale, shift = 1 / (255 * self.std), -self.mean / self.std
        out = pixels.mul_(scale.to(pixels.device).view(1, 3, 1, 1)).add_(shift.to(pixels.device).view(1, 3, 1, 1))
        if self.re_prob > 0:  # in place, one patch of per-pixel normal noise per erased image (timm's 'pixel' mode)
            from timm.data.random_erasing import RandomErasing
            RandomErasing(self.re_prob, mode='pixel', max_count=1, device=out.device)(out)
        return out

    def resize_each(self, images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, size, size): every crop resized on its own (the CPU implementation)."""
        views = images.contiguous(memory_format=torch.channels_last)  # the uint8 fast path wants channels-last
        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.uint8, device=images.device)
        for i, ((x0, y0, w, h), flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
            crop = F.interpolate(views[i:i + 1, :, y0:y0 + h, x0:x0 + w], size=(self.size, self.size),
                                 mode='bilinear', align_corners=False, antialias=False)[0]
            out[i] = crop.flip(-1) if flip else crop
        return out

    def resample_grid(self, images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Float pixels (B, 3, size, size) in [0, 255] by one batched ``grid_sample`` (the accelerator
        implementation)."""
        device, (height, width) = images.device, images.shape[2:]
        x0, y0, w, h = boxes.to(device, torch.float32).unbind(1)
        steps = torch.arange(self.size, dtype=torch.float32, device=device) + 0.5

        def axis(start, length, extent):  # pixel coordinates of the output samples, clamped inside the box
            inside = (steps * (length / self.size).unsqueeze(1) - 0.5).clamp(min=0)
            inside = torch.minimum(inside, (length - 1).unsqueeze(1))
            return (2 * (start.unsqueeze(1) + inside) + 1) / extent - 1  # grid_sample's units, align_corners=False
        xs, ys = axis(x0, w, width), axis(y0, h, height)
        xs = torch.where(flips.to(device).unsqueeze(1), xs.flip(1), xs)
        size = (len(images), self.size, self.size)
        grid = torch.stack([xs.unsqueeze(1).expand(size), ys.unsqueeze(2).expand(size)], dim=-1)
        return F.grid_sample(images.float(), grid, mode='bilinear', padding_mode='border', align_corners=False)
