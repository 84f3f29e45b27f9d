"""The tensor-resident data path (--data-cache): the cache is built once, reused and rebuilt when the data changes,
skips unreadable images as the PIL path does, augments batches with the right shapes and ranges, is seeded, and a
run resumed mid-epoch ends bit-identical to one that was not interrupted."""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import conv2former
from conv2former.engine.state import list_checkpoints
from conv2former.tasks.classification.data import ImageFolderDataset
from conv2former.tasks.classification.batch_augment import BatchAugment
from conv2former.tasks.classification.tensor_data import TensorImageDataset, build_tensor_cache

TINY = dict(model='conv2former_n', model_kwargs={'depths': [1, 1, 1, 1], 'dims': [8, 8, 16, 16]}, img_size=32,
            workers=2, progress=False, recipe='small', warmup_epochs=0)


def _tree(root: Path, per_class=(12, 4)) -> Path:
    rng = np.random.default_rng(0)
    for split, n in zip(('train', 'val'), per_class):
        for label, (cls, base) in enumerate((('dark', 60), ('bright', 190))):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f'{i}.png')
    return root


def _squash(img):
    return img.resize((16, 16))


def test_cache_is_built_once_reused_and_rebuilt_when_the_data_changes(tmp_path):
    data = _tree(tmp_path / 'data')
    cache = build_tensor_cache(data / 'train', 16, _squash, 'squash', cache_dir=tmp_path / 'cache')
    stamp = (cache / 'meta.json').stat().st_mtime_ns
    ds = TensorImageDataset(cache)
    image, target = ds[0]
    assert len(ds) == 24 and image.dtype == torch.uint8 and image.shape == (3, 16, 16) and target == 0
    expected = np.asarray(Image.open(sorted((data / 'train' / 'bright').iterdir())[0]).convert('RGB').resize((16, 16)))
    assert torch.equal(image, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    batch, targets = ds.__getitems__([3, 0, 5])  # one gather: the same pixels, channels-last for BatchAugment
    assert torch.equal(batch, torch.stack([ds[i][0] for i in (3, 0, 5)])) and targets.tolist() == [0, 0, 0]
    assert batch.is_contiguous(memory_format=torch.channels_last)
    val = TensorImageDataset(cache, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))  # normalised batches (validation)
    batch, _ = val.__getitems__([3, 0, 5])
    assert batch.dtype == torch.float32 and torch.allclose(batch, torch.stack([val[i][0] for i in (3, 0, 5)]))
    assert build_tensor_cache(data / 'train', 16, _squash, 'squash', cache_dir=tmp_path / 'cache') == cache
    assert (cache / 'meta.json').stat().st_mtime_ns == stamp  # reused, not rebuilt
    other_size = build_tensor_cache(data / 'train', 8, lambda im: im.resize((8, 8)), 'squash',
                                    cache_dir=tmp_path / 'cache')
    assert other_size != cache
    Image.new('RGB', (20, 24), (0, 0, 0)).save(data / 'train' / 'bright' / '0.png')  # same name, new content
    changed = build_tensor_cache(data / 'train', 16, _squash, 'squash', cache_dir=tmp_path / 'cache')
    assert changed not in (cache, other_size)
    assert TensorImageDataset(changed)[0][0].max() == 0


def test_unreadable_images_are_skipped_and_counted_as_in_the_pil_path(tmp_path):
    data = _tree(tmp_path / 'data')
    (data / 'train' / 'dark' / 'empty.png').write_bytes(b'')
    (data / 'train' / 'dark' / 'corrupt.png').write_bytes(b'not a png at all')
    pil = ImageFolderDataset(data / 'train')
    for i in range(len(pil)):
        pil[i]
    cache = build_tensor_cache(data / 'train', 16, _squash, 'squash', cache_dir=tmp_path / 'cache')
    ds = TensorImageDataset(cache)
    assert ds.num_skipped == pil.num_skipped == 2 and len(ds) == 24
    assert sorted(Path(p).name for p, _ in ds.skipped) == ['corrupt.png', 'empty.png']
    assert json.loads((cache / 'meta.json').read_text())['num_images'] == 24
    with pytest.raises(ValueError, match=r'empty \(zero-byte\) image file: .*empty.png'):
        build_tensor_cache(data / 'train', 16, _squash, 'strict', strict=True, cache_dir=tmp_path / 'cache2')
    (data / 'train' / 'dark' / 'empty.png').unlink()
    with pytest.raises(ValueError, match='unreadable image .*corrupt.png'):
        build_tensor_cache(data / 'train', 16, _squash, 'strict', strict=True, cache_dir=tmp_path / 'cache2')
    assert not list((tmp_path / 'cache2').glob('*/meta.json'))  # nothing half-built is left to be trusted


def test_batch_augment_shapes_ranges_identity_and_flip():
    images = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)
    torch.manual_seed(0)
    out = BatchAugment(16, scale=(0.3, 1.0))(images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    pixels = out * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.1
    square = images[:, :, :16, :16]
    whole = BatchAugment(16, scale=(1, 1), ratio=(1, 1), hflip=0.0)(square)  # the full image, same size
    assert torch.allclose(whole * std + mean, square.float() / 255, atol=1e-5)
    flipped = BatchAugment(16, scale=(1, 1), ratio=(1, 1), hflip=1.0)(square)
    assert torch.allclose(flipped, whole.flip(3), atol=1e-5)
    with pytest.raises(ValueError, match='uint8'):
        BatchAugment(16)(square.float())


def test_batch_augment_cpu_and_accelerator_implementations_agree():
    """The per-image uint8 resize (CPU) and the batched grid_sample (accelerators) are one resampling: same boxes ->
    the same pixels up to the CPU path's rounding, enlarging and shrinking; a box of the output size is copied."""
    images = torch.randint(0, 256, (16, 3, 40, 36), dtype=torch.uint8)
    for size, scale in ((40, (0.3, 1.0)), (24, (0.3, 1.0)), (64, (0.05, 1.0))):
        aug = BatchAugment(size, scale=scale)
        torch.manual_seed(size)
        boxes, flips = aug.boxes(16, 40, 36)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 36).all()
        assert (boxes[:, 1] + boxes[:, 3] <= 40).all() and flips.any() and not flips.all()
        grid = aug.resample_grid(images, boxes, flips)
        per_image = aug.resize_each(images, boxes, flips).float()
        assert (grid - per_image).abs().max() <= 1 + 1e-3, size
    aug = BatchAugment(8)
    boxes, flips = torch.tensor([[5, 3, 8, 8], [0, 0, 8, 8]]), torch.tensor([False, True])
    expected = torch.stack([images[0, :, 3:11, 5:13], images[1, :, :8, :8].flip(-1)]).float()
    assert torch.equal(aug.resize_each(images[:2], boxes, flips).float(), expected)
    assert torch.allclose(aug.resample_grid(images[:2], boxes, flips), expected, atol=1e-3)


def test_batch_augment_random_erasing_replaces_one_rectangle_per_image():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(5)
    plain = BatchAugment(32, scale=(0.5, 1.0))(images)
    for seed, prob in ((5, 1.0), (6, 0.0)):
        torch.manual_seed(5)
        random.seed(seed)
        erased = BatchAugment(32, scale=(0.5, 1.0), re_prob=prob)(images)
        for a, b in zip(plain, erased):
            changed = (a != b).any(0)
            if prob == 0:
                assert not changed.any()
                continue
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            assert len(rows) and len(cols)  # one filled rectangle (noise may match by chance in a pixel or two)
            box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.float().mean() > 0.95 and changed.sum() == box.sum()


def test_batch_augment_is_seeded():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(24, scale=(0.2, 1.0))
    torch.manual_seed(3)
    a = aug(images)
    torch.manual_seed(3)
    b = aug(images)
    torch.manual_seed(4)
    c = aug(images)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_on_the_cache_resumes_mid_epoch_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv('CONV2FORMER_CACHE', str(tmp_path / 'cache'))
    data = _tree(tmp_path / 'data')
    common = dict(TINY, data=str(data), data_cache=True, epochs=2, batch_size=4, checkpoint_steps=2, reprob=0.5,
                  aa='rand-m9-mstd0.5-inc1',
                  checkpoint_hist=100, output=tmp_path)
    straight = conv2former.train(experiment='straight', **common)
    assert 0 <= straight['val_top1'] <= 100 and straight['epoch'] == 2  # epochs count from 1
    assert len(list((tmp_path / 'cache' / 'tensor-cache').glob('*/meta.json'))) == 2  # train + val caches
    shutil.copytree(tmp_path / 'straight', tmp_path / 'cut')
    cut = tmp_path / 'cut'
    mid = [c for c in list_checkpoints(cut) if c.name.startswith('epoch-0001-step-00000004')]
    assert mid, [c.name for c in list_checkpoints(cut)]
    for later in list_checkpoints(cut)[list_checkpoints(cut).index(mid[0]) + 1:]:
        shutil.rmtree(later)
    shutil.rmtree(cut / 'last')
    conv2former.train(resume=mid[0])
    a, b = (load_file(str(tmp_path / name / 'last' / 'model.safetensors')) for name in ('straight', 'cut'))
    assert all(torch.equal(a[k], b[k]) for k in a), 'the resumed run diverged from the straight one'


def test_cache_refuses_timm_sources(tmp_path):
    from conv2former.api import build_options
    with pytest.raises(ValueError, match='timm source'):
        build_options('classification', dict(data='torch/cifar10', data_cache=True, recipe='small'))
    assert build_options('classification', dict(data=str(tmp_path), data_cache=True, recipe='small')).data_cache


def test_bench_data_path_times_every_loader_on_one_tree(tmp_path):
    """``python -m benchmarks.bench_data_path`` (one tiny round): timm's PIL loader, the engine's own PIL loader and
    the tensor cache are each timed, and the JSON gives their rates and ratios."""
    import subprocess
    import sys
    root = _tree(tmp_path / 'data')
    out = tmp_path / 'bench'
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.bench_data_path', '--data', str(root), '--img-size', '16',
                           '-b', '4', '-j', '0', '--batches', '2', '--rounds', '1', '--train-steps', '0',
                           '--out', str(out)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.with_suffix('.json').read_text())
    assert {'pil', 'engine', 'tensor', 'tensor_fetch'} <= result['median'].keys()
    assert all(len(result['rates'][k]) == 1 and result['median'][k] > 0 for k in ('pil', 'engine', 'tensor'))
    assert result['ratio_engine_over_pil'] == pytest.approx(result['median']['engine'] / result['median']['pil'])
