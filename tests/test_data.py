"""conv2former.data: bundled dataset, archive extraction (cache, atomicity, safety), splits, image modes, bad files."""
import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import conv2former.data as data
from conv2former.data import BUNDLED_DATASET, IMG_EXTENSIONS, find_split, load_rgb, resolve_data_dir
from conv2former.tasks.classification.data import ImageFolderDataset, build_datasets

FASHION_CLASSES = ['ankle_boot', 'bag', 'coat', 'dress', 'pullover', 'sandal', 'shirt', 'sneaker', 't-shirt_top',
                   'trouser']


def write_png(path: Path, value=(128, 128, 128), size=(4, 4), mode='RGB') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def make_tree(root: Path, splits=('train', 'val'), classes=('cat', 'dog'), per_class=2) -> Path:
    for split in splits:
        for ci, c in enumerate(classes):
            for i in range(per_class):
                write_png(root / split / c / f'{i}.png', value=(10 * ci, 10 * i, 0))
    return root


def make_tar(path: Path, src: Path, arcname_prefix='') -> Path:
    with tarfile.open(path, 'w:gz') as tar:
        for p in sorted(src.rglob('*')):
            tar.add(p, arcname=arcname_prefix + p.relative_to(src).as_posix(), recursive=False)
    return path


def tar_with_member(path: Path, info: tarfile.TarInfo, payload: bytes = b'x') -> Path:
    with tarfile.open(path, 'w') as tar:
        ok = tarfile.TarInfo('train/cat/0.png')
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b'x'))
        if info.isfile():
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        else:
            tar.addfile(info)
    return path


# ------------------------------------------------------------------------------------------------------ bundled dataset
@pytest.fixture(scope='module')
def bundled(tmp_path_factory):
    cache = tmp_path_factory.mktemp('cache')
    return cache, resolve_data_dir(None, cache_dir=cache)


def test_bundled_dataset(bundled):
    cache, root = bundled
    assert BUNDLED_DATASET.is_file() and BUNDLED_DATASET.stat().st_size < 4 * 2 ** 20
    assert root.parent == cache and root.name.startswith('fashion-mnist-subset-')
    assert 'Zalando' in (root / 'LICENSE').read_text()
    train, val, classes = build_datasets(root)
    assert classes == FASHION_CLASSES == train.class_names == val.class_names
    assert len(train) == 6000 and len(val) == 1000
    assert np.bincount(train.targets).tolist() == [600] * 10 and np.bincount(val.targets).tolist() == [100] * 10
    assert train.num_skipped == val.num_skipped == 0
    for ds, i in ((train, 0), (train, 5999), (val, 123)):
        img, target = ds[i]
        assert img.mode == 'RGB' and img.size == (28, 28) and target == ds.targets[i]
        r, g, b = (np.asarray(img)[..., k] for k in range(3))
        assert (r == g).all() and (g == b).all() and r.max() > r.min()  # grayscale, not blank
    # files come from the official splits: train indices < 60000, val indices < 10000, disjoint name spaces
    assert all(int(Path(p).stem) < 60000 for p, _ in train.samples)
    assert all(int(Path(p).stem) < 10000 for p, _ in val.samples)


def test_bundled_extracted_once(bundled, monkeypatch):
    cache, root = bundled
    inode, mtime = root.stat().st_ino, root.stat().st_mtime_ns

    def no_tar(*a, **k):
        raise AssertionError('archive re-extracted')
    monkeypatch.setattr(tarfile, 'open', no_tar)
    assert resolve_data_dir(None, cache_dir=cache) == root
    assert root.stat().st_ino == inode and root.stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] == [root.name]  # no temp folders left behind


def test_cache_env_var_and_archive_with_top_folder(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / 'pets.tgz', make_tree(tmp_path / 'src'), arcname_prefix='pets/')
    monkeypatch.setenv('CONV2FORMER_CACHE', str(tmp_path / 'envcache'))
    root = resolve_data_dir(archive)
    assert root.name == 'pets' and root.parent.parent == tmp_path / 'envcache'
    assert root.parent.name.startswith('pets-')
    train, val, classes = build_datasets(root)
    assert classes == ['cat', 'dog'] and len(train) == len(val) == 4
    # a plain directory is returned as is; a changed archive (size/mtime) gets a fresh cache folder
    assert resolve_data_dir(tmp_path / 'src') == (tmp_path / 'src').resolve()
    os.utime(archive, ns=(0, 10 ** 18))
    assert resolve_data_dir(archive).parent != root.parent


def test_interrupted_extraction_is_not_trusted(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / 'd.tar.gz', make_tree(tmp_path / 'src', per_class=3))
    cache = tmp_path / 'cache'
    real_extract = data._extract

    def partial_then_die(arc, dest):  # writes part of the tree, then "dies" without cleaning up
        write_png(Path(dest) / 'train' / 'cat' / '0.png')
        raise KeyboardInterrupt
    monkeypatch.setattr(data, '_extract', partial_then_die)
    monkeypatch.setattr(data.shutil, 'rmtree', lambda *a, **k: None)  # as if killed: the temp dir stays
    with pytest.raises(KeyboardInterrupt):
        resolve_data_dir(archive, cache_dir=cache)
    leftovers = list(cache.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith('.')  # only a hidden temp dir, never the target
    monkeypatch.undo()

    root = resolve_data_dir(archive, cache_dir=cache)
    train, val, _ = build_datasets(root)
    assert len(train) == len(val) == 6  # the full tree, not the leftover partial one
    assert real_extract is data._extract


def test_extraction_failure_cleans_up_and_concurrent_winner_is_used(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / 'd.tar', make_tree(tmp_path / 'src'))
    cache = tmp_path / 'cache'
    real_extract = data._extract

    def boom(arc, dest):
        real_extract(arc, dest)
        raise OSError('disk full')
    monkeypatch.setattr(data, '_extract', boom)
    with pytest.raises(OSError, match='disk full'):
        resolve_data_dir(archive, cache_dir=cache)
    assert list(cache.iterdir()) == []  # the temp dir was removed, nothing trusted

    def other_process_wins(arc, dest):  # another process finishes and renames its copy first
        real_extract(arc, dest)
        winner = Path(dest).parent / Path(dest).name.split('.tmp-')[0].lstrip('.')
        make_tree(winner, per_class=1)
        (winner / 'winner').touch()
    monkeypatch.setattr(data, '_extract', other_process_wins)
    root = resolve_data_dir(archive, cache_dir=cache)
    assert (root / 'winner').exists() and [p.name for p in cache.iterdir()] == [root.name]


@pytest.mark.parametrize('kind', ['absolute', 'dotdot', 'nested_dotdot', 'symlink', 'hardlink', 'device', 'fifo'])
def test_malicious_tar_members_rejected(tmp_path, kind):
    info = tarfile.TarInfo({'absolute': '/tmp/conv2former-evil.png', 'dotdot': '../evil.png',
                            'nested_dotdot': 'train/../../evil.png'}.get(kind, 'train/cat/evil.png'))
    if kind == 'symlink':
        info.type, info.linkname = tarfile.SYMTYPE, '/etc/passwd'
    elif kind == 'hardlink':
        info.type, info.linkname = tarfile.LNKTYPE, 'train/cat/0.png'
    elif kind == 'device':
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == 'fifo':
        info.type = tarfile.FIFOTYPE
    archive = tar_with_member(tmp_path / 'evil.tar', info)
    cache = tmp_path / 'cache'
    with pytest.raises(ValueError, match='refusing to extract') as e:
        resolve_data_dir(archive, cache_dir=cache)
    assert str(archive) in str(e.value)
    assert not (tmp_path / 'evil.png').exists() and not Path('/tmp/conv2former-evil.png').exists()
    assert list(cache.iterdir()) == []


def test_bad_data_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist') as e:
        resolve_data_dir(tmp_path / 'nope')
    assert str(tmp_path / 'nope') in str(e.value)
    (tmp_path / 'notes.txt').write_text('hi')
    with pytest.raises(ValueError, match='neither a directory nor a .tar') as e:
        resolve_data_dir(tmp_path / 'notes.txt')
    assert 'notes.txt' in str(e.value)
    (tmp_path / 'broken.tar.gz').write_bytes(b'not a tar at all')
    with pytest.raises(ValueError, match='not a readable tar archive') as e:
        resolve_data_dir(tmp_path / 'broken.tar.gz', cache_dir=tmp_path / 'cache')
    assert 'broken.tar.gz' in str(e.value)


# -------------------------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize('train_name,val_name', [('training', 'validation'), ('train', 'test'), ('Train', 'VALID'),
                                                 ('train', 'eval')])
def test_split_synonyms(tmp_path, train_name, val_name):
    make_tree(tmp_path, splits=(train_name, val_name))
    assert find_split(tmp_path, 'train') == tmp_path / train_name
    assert find_split(tmp_path, 'val') == tmp_path / val_name
    train, val, classes = build_datasets(tmp_path)
    assert classes == ['cat', 'dog'] and len(train) == len(val) == 4


def test_val_preferred_over_test(tmp_path):
    make_tree(tmp_path, splits=('train', 'test', 'val'))
    assert find_split(tmp_path, 'validation') == tmp_path / 'val'


def test_missing_split_error(tmp_path):
    make_tree(tmp_path, splits=('train', 'other'))
    with pytest.raises(FileNotFoundError) as e:
        find_split(tmp_path, 'val')
    msg = str(e.value)
    assert str(tmp_path) in msg and "'val'" in msg and 'validation' in msg and 'test' in msg
    assert 'other' in msg and 'train' in msg  # lists the subfolders found
    with pytest.raises(ValueError, match='unknown split'):
        find_split(tmp_path, 'holdout')


def test_empty_folders(tmp_path):
    with pytest.raises(ValueError, match='no class folders') as e:
        ImageFolderDataset(tmp_path)
    assert str(tmp_path) in str(e.value) and '<root>/<class>/<image>' in str(e.value)
    (tmp_path / 'cat').mkdir()
    (tmp_path / 'cat' / 'readme.txt').write_text('not an image')
    with pytest.raises(ValueError, match='no readable images') as e:
        ImageFolderDataset(tmp_path)
    assert '<root>/<class>/<image>' in str(e.value)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        ImageFolderDataset(tmp_path / 'missing')


def test_samples_sorted_recursive_case_insensitive(tmp_path):
    write_png(tmp_path / 'b' / 'z.PNG')
    write_png(tmp_path / 'b' / 'sub' / 'deeper' / 'a.png')
    write_png(tmp_path / 'a' / 'x.JPEG')
    (tmp_path / 'a' / 'notes.txt').write_text('skip me')
    (tmp_path / 'a' / '._x.png').write_bytes(b'\0' * 10)  # macOS resource fork: hidden, ignored
    (tmp_path / '.ipynb_checkpoints').mkdir()
    ds = ImageFolderDataset(tmp_path, transform=lambda im: im.size)
    assert ds.class_names == ['a', 'b'] and ds.class_to_idx == {'a': 0, 'b': 1}
    assert [(Path(p).relative_to(tmp_path).as_posix(), t) for p, t in ds.samples] == [
        ('a/x.JPEG', 0), ('b/sub/deeper/a.png', 1), ('b/z.PNG', 1)]
    assert ds.targets == [0, 1, 1] and ds[1] == ((4, 4), 1)
    assert '.jpeg' in IMG_EXTENSIONS


def test_class_names_argument(tmp_path):
    make_tree(tmp_path, splits=('train',))
    ds = ImageFolderDataset(tmp_path / 'train', class_names=['dog', 'cat'])  # the given order fixes the indices
    assert ds.class_names == ['dog', 'cat'] and {Path(p).parent.name: t for p, t in ds.samples} == {'dog': 0, 'cat': 1}
    with pytest.raises(ValueError) as e:
        ImageFolderDataset(tmp_path / 'train', class_names=['cat', 'dog', 'bird'])
    msg = str(e.value)
    assert "['cat', 'dog', 'bird']" in msg and "['cat', 'dog']" in msg and 'bird' in msg


def test_train_val_class_mismatch(tmp_path):
    make_tree(tmp_path, splits=('train',), classes=('cat', 'dog', 'fox'))
    make_tree(tmp_path, splits=('val',), classes=('cat', 'dog', 'owl'))
    with pytest.raises(ValueError, match='classes differ') as e:
        build_datasets(tmp_path)
    msg = str(e.value)
    assert "only in train (train): ['fox']" in msg and "only in val (val): ['owl']" in msg


# ---------------------------------------------------------------------------------------------------------- image modes
def _px(img: Image.Image, xy=(0, 0)):
    assert img.mode == 'RGB'
    return img.getpixel(xy)


def test_mode_conversions(tmp_path):
    def saved(im, name, **kw):
        im.save(tmp_path / name, **kw)
        return load_rgb(tmp_path / name)

    assert _px(saved(Image.new('RGB', (2, 2), (1, 2, 3)), 'rgb.png')) == (1, 2, 3)
    assert _px(saved(Image.new('L', (2, 2), 128), 'l.png')) == (128, 128, 128)
    assert _px(saved(Image.new('1', (2, 2), 1), 'one.png')) == (255, 255, 255)
    assert _px(saved(Image.new('1', (2, 2), 0), 'zero.bmp')) == (0, 0, 0)

    pal = Image.new('P', (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    img = saved(pal, 'p.png')
    assert _px(img, (0, 0)) == (0, 0, 0) and _px(img, (1, 0)) == (10, 20, 30)
    img = saved(pal, 'pt.png', transparency=0)
    assert Image.open(tmp_path / 'pt.png').mode == 'P'
    assert _px(img, (0, 0)) == (255, 255, 255) and _px(img, (1, 0)) == (10, 20, 30)
    img = saved(pal, 'pt.gif', transparency=0)
    assert _px(img, (0, 0)) == (255, 255, 255) and _px(img, (1, 0)) == (10, 20, 30)

    img = saved(Image.new('CMYK', (8, 8), (0, 255, 255, 0)), 'cmyk.jpg', quality=100)
    assert Image.open(tmp_path / 'cmyk.jpg').mode == 'CMYK'
    assert np.allclose(_px(img), (255, 0, 0), atol=3)

    la = Image.new('LA', (3, 1))
    la.putdata([(100, 0), (100, 255), (0, 128)])
    img = saved(la, 'la.png')
    assert [_px(img, (x, 0)) for x in range(3)] == [(255, 255, 255), (100, 100, 100), (127, 127, 127)]
    img = saved(Image.new('RGBA', (2, 2), (255, 0, 0, 128)), 'rgba.png')
    assert _px(img) == (255, 127, 127)
    img = saved(Image.new('RGBA', (2, 2), (0, 0, 255, 0)), 'rgba.webp', lossless=True)
    assert _px(img) == (255, 255, 255)
    img = saved(Image.new('L', (2, 2), 7), 'l_trns.png', transparency=7)  # grayscale with a transparent colour
    assert _px(img) == (255, 255, 255)


def test_high_bit_depth(tmp_path):
    a16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / 'i16.png')
    assert Image.open(tmp_path / 'i16.png').mode.startswith(('I;16', 'I'))
    assert np.asarray(load_rgb(tmp_path / 'i16.png'))[0, :, 0].tolist() == [0, 1, 128, 255]
    Image.frombytes('I;16B', (4, 1), a16.astype('>u2').tobytes()).save(tmp_path / 'i16b.tif')
    assert Image.open(tmp_path / 'i16b.tif').mode == 'I;16B'
    assert np.asarray(load_rgb(tmp_path / 'i16b.tif'))[0, :, 1].tolist() == [0, 1, 128, 255]

    Image.fromarray(a16.astype(np.int32)).save(tmp_path / 'i32_16bit_range.tif')
    assert Image.open(tmp_path / 'i32_16bit_range.tif').mode == 'I'
    assert np.asarray(load_rgb(tmp_path / 'i32_16bit_range.tif'))[0, :, 2].tolist() == [0, 1, 128, 255]
    Image.fromarray(np.array([[-1000, 0, 99000, 199000]], dtype=np.int32)).save(tmp_path / 'i32.tif')
    assert np.asarray(load_rgb(tmp_path / 'i32.tif'))[0, :, 0].tolist() == [0, 1, 128, 255]

    Image.fromarray(np.array([[0, 0.5, 1]], dtype=np.float32)).save(tmp_path / 'f_unit.tif')
    assert Image.open(tmp_path / 'f_unit.tif').mode == 'F'
    assert np.asarray(load_rgb(tmp_path / 'f_unit.tif'))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[-2.0, 1.0, 4.0, np.nan]], dtype=np.float32)).save(tmp_path / 'f_wide.tif')
    out = load_rgb(tmp_path / 'f_wide.tif')
    assert out.mode == 'RGB' and np.asarray(out)[0, :, 0].tolist() == [0, 128, 255, 85]  # NaN -> 0 -> (0+2)/6*255


# ------------------------------------------------------------------------------------------------------ bad image files
def _noise_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_load_rgb_errors_name_the_file(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    garbage = tmp_path / 'garbage.jpg'
    garbage.write_bytes(b'\xff\xd8\xff' + b'garbage' * 20)
    full = _noise_png(tmp_path / 'full.png').read_bytes()
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes(full[:len(full) * 6 // 10])
    for path, words in ((empty, 'zero-byte'), (garbage, 'cannot read'), (truncated, 'cannot read')):
        with pytest.raises(OSError, match=words) as e:
            load_rgb(path)
        assert str(path) in str(e.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_byte_files_skipped_or_strict(tmp_path):
    make_tree(tmp_path, splits=('train',))
    empty = tmp_path / 'train' / 'cat' / 'empty.png'
    empty.write_bytes(b'')
    ds = ImageFolderDataset(tmp_path / 'train')
    assert len(ds) == 4 and ds.num_skipped == 1 and ds.skipped == [(str(empty), 'empty (zero-byte) file')]
    assert str(empty) not in [p for p, _ in ds.samples]
    with pytest.raises(ValueError, match='zero-byte') as e:
        ImageFolderDataset(tmp_path / 'train', strict=True)
    assert str(empty) in str(e.value)


def test_corrupt_images_skipped_with_warning(tmp_path, caplog):
    root = tmp_path / 'ds'
    good_cat = write_png(root / 'cat' / '0.png', (1, 1, 1))
    bad = _noise_png(root / 'cat' / '1.png')
    bad.write_bytes(bad.read_bytes()[:500])  # truncated
    corrupt = root / 'dog' / '0.png'
    corrupt.parent.mkdir()
    corrupt.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 64)
    write_png(root / 'dog' / '1.png', (2, 2, 2))
    ds = ImageFolderDataset(root)
    assert [Path(p).relative_to(root).as_posix() for p, _ in ds.samples] == ['cat/0.png', 'cat/1.png', 'dog/0.png',
                                                                            'dog/1.png']
    with caplog.at_level(logging.WARNING, logger='conv2former.data'):
        img, target = ds[1]  # truncated -> the corrupt one -> the next readable: dog/1.png
    assert _px(img) == (2, 2, 2) and target == 1
    assert ds.num_skipped == 2 and [p for p, _ in ds.skipped] == [str(bad), str(corrupt)]
    assert str(bad) in caplog.text and str(corrupt) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='conv2former.data'):
        assert ds[2][1] == 1 and ds[0][0].getpixel((0, 0)) == (1, 1, 1)
    assert ds.num_skipped == 2 and caplog.text == ''  # known-bad files are not re-read or re-counted
    assert good_cat.exists()

    strict = ImageFolderDataset(root, strict=True)
    with pytest.raises(ValueError) as e:
        strict[1]
    assert str(bad) in str(e.value)
    assert strict[0][1] == 0


def _merge_worker(rank: int, root: str, init_file: str, out: str):
    from datetime import timedelta

    import torch.distributed as dist
    from conv2former.engine.distributed import DistEnv
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        ds = ImageFolderDataset(root)
        ds[rank]  # rank 0 reads cat/0 (readable), rank 1 reads cat/1 (truncated, then dog/0: corrupt)
        before = ds.num_skipped
        ds.merge_skipped(DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device('cpu')))
        Path(out, f'rank{rank}.txt').write_text(f'{before} {ds.num_skipped} {sorted(p for p, _ in ds.skipped)}')
    finally:
        dist.destroy_process_group()


def test_skip_counts_are_merged_across_torchrun_ranks(tmp_path):
    """Each rank finds only the unreadable images it reads; merged, every rank reports the run's count (not a sum:
    an image found bad by two ranks counts once)."""
    import torch.multiprocessing as mp
    root = tmp_path / 'ds'
    write_png(root / 'cat' / '0.png', (1, 1, 1))
    bad = _noise_png(root / 'cat' / '1.png')
    bad.write_bytes(bad.read_bytes()[:500])
    (root / 'dog').mkdir()
    (root / 'dog' / '0.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 64)
    write_png(root / 'dog' / '1.png', (2, 2, 2))
    mp.spawn(_merge_worker, args=(str(root), str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    got = [(tmp_path / f'rank{r}.txt').read_text().split(' ', 2) for r in range(2)]
    assert [g[:2] for g in got] == [['0', '2'], ['2', '2']]
    assert got[0][2] == got[1][2] == str(sorted([str(bad), str(root / 'dog' / '0.png')]))


def test_wraps_around_and_all_unreadable(tmp_path, caplog):
    write_png(tmp_path / 'a' / '0.png', (9, 9, 9))
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / '0.png').write_bytes(b'nope')
    ds = ImageFolderDataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger='conv2former.data'):
        img, target = ds[1]  # last sample unreadable: wraps to index 0
    assert target == 0 and _px(img) == (9, 9, 9)
    assert ds[-1][1] == 0
    with pytest.raises(IndexError):
        ds[2]

    (tmp_path / 'a' / '0.png').write_bytes(b'also broken')
    ds = ImageFolderDataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger='conv2former.data'), pytest.raises(RuntimeError, match='no readable'):
        ds[0]


def test_seeded_samples_draw_the_streams_seed_all_gives_without_touching_cuda_seeding():
    """SeededDataset seeds only the CPU generators per sample (torch.manual_seed costs 140 us in CUDA builds):
    every generator a transform draws from gives what seed_all would, per (seed, epoch, index)."""
    import random
    from conv2former.engine.runtime import SeededDataset, derive_seed, seed_all

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return random.random(), float(np.random.rand()), torch.rand(2)

    seeded = SeededDataset(Draws(), seed=5)
    seeded.epoch = 2
    for index in range(4):
        seed_all(derive_seed(5, 2, index))
        expected = Draws()[index]
        got = seeded[index]
        assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    assert seeded[0][0] != seeded[1][0]  # another sample, other draws
    epoch2 = seeded[0]
    seeded.epoch = 3
    assert seeded[0][0] != epoch2[0] and not torch.equal(seeded[0][2], epoch2[2])  # another epoch, other draws
    assert seeded[0][0] == seeded[0][0]  # and the same sample, epoch and seed again the same
