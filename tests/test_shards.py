"""WebDataset tar shards as --data (issue 24): shards written by webdataset's own ShardWriter and in timm's published
layout are read as they are; training from shards resumes bit-identically after SIGKILL, sees each sample once per
epoch across 2 gloo processes and scores every val sample once, shuffles independently of the worker count, skips
and counts corrupt or label-less samples (--strict fails); --data-cache, validate, predict --data, sweep and the
Python API take shards; ``conv2former shards`` writes them (count check, class names, no overwrite)."""
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conv2former
from conftest import kill_at_checkpoint
from test_training import _run_cli, _weights, one_and_two_processes
from conv2former.cli import main
from conv2former.engine.runtime import SeededDataset
from conv2former.shards import ShardDataset, build_shard_datasets, find_shard_split, is_shard_source

wds = pytest.importorskip('webdataset')

TINY = ['--model', 'conv2former_n', '--model-kwargs', 'depths=[1,1,1,1]', 'dims=[16,32,64,128]', '--img-size', '32',
        '--no-progress']
ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
LEVELS = (60, 190)  # dark / bright: learnable in a step or two


def _image(label: int, rng, fmt: str = 'JPEG', level=None) -> bytes:
    base = LEVELS[label] if level is None else level
    pixels = np.clip(base + rng.normal(0, 30 if level is None else 0, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def write_wds_shards(root: Path, n_train: int = 48, n_val: int = 17, per_shard: int = 10, json_labels=False,
                     extra=None) -> Path:
    """Shards written by webdataset's own ShardWriter: ``root/train/train-%06d.tar`` and ``root/val/...``; labels as
    ``.cls`` (or ``.json`` ``{"label": N}``), images JPEG with a few PNG and WebP."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        (root / split).mkdir(parents=True)
        with wds.ShardWriter(str(root / split / f'{split}-%06d.tar'), maxcount=per_shard, verbose=0) as sink:
            for i in range(n):
                label = i % 2
                fmt, ext = (('PNG', 'png'), ('WEBP', 'webp'), ('JPEG', 'jpg'))[min(i % 7, 2)]
                sample = {'__key__': f'{split}/{i:05d}', ext: _image(label, rng, fmt)}
                sample.update({'json': {'label': label, 'filename': f'{i}.jpg'}} if json_labels else {'cls': label})
                sink.write(sample)
            for sample in (extra or {}).get(split, []):
                sink.write(sample)
    (root / 'classes.txt').write_text('dark\nbright\n')
    return root


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> Path:
    return write_wds_shards(tmp_path_factory.mktemp('wds') / 'shards')


def _train_args(data, out, name, *extra):
    return ['train', '--data', str(data), '--output', str(out), '--experiment', name, *TINY, *extra]


# ------------------------------------------------------------------------------------------------ reading
def test_shardwriter_shards_are_read_with_their_splits_labels_and_class_names(shards, tmp_path):
    assert is_shard_source(shards) and is_shard_source(f'{shards}/train/train-{{000000..000004}}.tar')
    assert not is_shard_source(tmp_path) and not is_shard_source(None) and not is_shard_source('torch/cifar10')
    train, val, names = build_shard_datasets(shards, cache_dir=tmp_path / 'index')
    assert names == ['dark', 'bright'] and len(train) == 48 and len(val) == 17 and len(train.files) == 5
    assert train.targets.tolist() == [i % 2 for i in range(48)]
    image, label = train[8]  # a WebP sample (key with a folder part: 'train/00008')
    assert image.mode == 'RGB' and image.size == (32, 32) and label == 0
    assert train.samples[8][0].endswith('train-000000.tar:train/00008')
    # a brace pattern is the training split; its val split is found in the sibling split folder
    pattern_train, pattern_val, _ = build_shard_datasets(f'{shards}/train/train-{{000000..000004}}.tar',
                                                         cache_dir=tmp_path / 'index')
    assert len(pattern_train) == 48 and len(pattern_val) == 17
    assert len(find_shard_split(f'{shards}/train/train-000000.tar,{shards}/train/train-000001.tar', 'train').files) == 2
    assert len(list((tmp_path / 'index').iterdir())) == 7  # each shard indexed once, then read from the cache


def test_timm_layout_json_labels_info_file_and_label_indices(tmp_path):
    """timm's published layout: one folder of <name>-train-NNNN.tar / <name>-validation-NNNN.tar with _info.json,
    labels in each sample's .json; without class names the label indices name the classes."""
    src = write_wds_shards(tmp_path / 'src', 20, 6, per_shard=8, json_labels=True)
    flat = tmp_path / 'imagenet-toy-wds'
    flat.mkdir()
    info = dict(name='toy', splits={})
    for split, timm_name in (('train', 'train'), ('val', 'validation')):
        files = sorted((src / split).glob('*.tar'))
        for k, f in enumerate(files):
            f.rename(flat / f'toy-{timm_name}-{k:04d}.tar')
        info['splits'][timm_name] = dict(name=timm_name, num_samples=20 if split == 'train' else 6,
                                         filenames=[f'toy-{timm_name}-{k:04d}.tar' for k in range(len(files))],
                                         shard_lengths=[])
    (flat / '_info.json').write_text(json.dumps(info))
    train, val, names = build_shard_datasets(flat, cache_dir=tmp_path / 'index')
    assert names == ['0', '1'] and len(train) == 20 and len(val) == 6 and len(train.files) == 3
    (flat / '_info.json').unlink()  # the split words in the file names are enough
    train, val, _ = build_shard_datasets(flat, cache_dir=tmp_path / 'index')
    assert len(train) == 20 and len(val) == 6
    train, val, _ = build_shard_datasets(f'{flat}/toy-train-{{0000..0002}}.tar', cache_dir=tmp_path / 'index')
    assert len(val) == 6 and all('validation' in f.name for f in val.files)


def test_corrupt_and_label_less_samples_are_skipped_and_counted_or_fail_with_strict(tmp_path, capsys):
    rng = np.random.default_rng(1)
    good = _image(0, rng)
    extra = dict(train=[{'__key__': 'nolabel', 'jpg': good},                       # no .cls / .json
                        {'__key__': 'badjson', 'jpg': good, 'json': {'name': 'x'}},  # .json without a label
                        {'__key__': 'corrupt', 'jpg': good[:40], 'cls': 1}],       # undecodable image
                 val=[{'__key__': 'corrupt', 'jpg': b'not an image', 'cls': 0}])
    data = write_wds_shards(tmp_path / 'shards', 15, 6, per_shard=8, extra=extra)  # 16 labelled: 2 full batches
    train, val, _ = build_shard_datasets(data, cache_dir=tmp_path / 'index')
    assert len(train) == 16 and train.num_skipped == 2 and len(val) == 7  # the corrupt one is found when read
    assert main(_train_args(data, tmp_path, 'skip', '-j', '2', '--epochs', '1', '-b', '8')) == 0
    log = (tmp_path / 'skip' / 'log.txt').read_text()
    results = json.loads((tmp_path / 'skip' / 'results.json').read_text())
    assert 'nolabel' in log and 'badjson' in log and 'corrupt' in log
    assert results['skipped_images'] == 4 and results['num_samples'] == 6  # the bad val sample is in no metric
    assert 'skipped 4 file(s) in all (3 train, 1 val)' in log
    rc = main(_train_args(data, tmp_path, 'strict', '-j', '0', '--epochs', '1', '-b', '8', '--strict'))
    assert rc == 2 and 'nolabel' in capsys.readouterr().err and not (tmp_path / 'strict').exists()


def test_damaged_shards_and_missing_splits_are_one_line_errors(shards, tmp_path, capsys):
    import shutil
    data = shutil.copytree(shards, tmp_path / 'data')
    broken = data / 'train' / 'train-000001.tar'
    broken.write_bytes(broken.read_bytes()[:20000])  # an interrupted download: refused, not half-read
    cases = [(data, 'train-000001.tar: truncated or damaged shard'),
             (f'{data}/train/train-{{000000..000009}}.tar', 'do not exist'), (data / 'train', "no 'val' shards in")]
    for source, message in cases:
        assert main(_train_args(source, tmp_path, 'bad', '-j', '0')) == 2
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1, err
    (data / 'train' / 'train-000000.tar').write_bytes(b'')
    with pytest.raises(ValueError, match='empty'):
        build_shard_datasets(data, cache_dir=tmp_path / 'index')


def test_shuffle_does_not_depend_on_the_number_of_workers(shards, tmp_path):
    from timm.data import create_transform
    from torch.utils.data import DataLoader, DistributedSampler
    train, _, _ = build_shard_datasets(shards, cache_dir=tmp_path / 'index')
    train.transform = create_transform(32, is_training=True)  # random crop, flip, colour jitter
    seeded = SeededDataset(train, seed=3)
    sampler = DistributedSampler(seeded, num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(seeded, batch_size=8, sampler=list(sampler), num_workers=workers)
        batches.append([b for b in loader])
    assert len(batches[0]) == 6
    for (x0, y0), (x2, y2) in zip(*batches):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_each_sample_once_per_epoch_across_two_ranks(tmp_path):
    """The engine's sampler over shards on 2 ranks, read through 2 loader workers each: every sample of the epoch
    on exactly one rank, a new order each epoch."""
    from torch.utils.data import DataLoader, DistributedSampler
    rng = np.random.default_rng(0)
    root = tmp_path / 'levels'
    for split, n in (('train', 40), ('val', 4)):
        (root / split).mkdir(parents=True)
        with wds.ShardWriter(str(root / split / '%06d.tar'), maxcount=7, verbose=0) as sink:
            for i in range(n):  # each image its own grey level: the level names the sample
                sink.write({'__key__': f'{i:04d}', 'png': _image(0, rng, 'PNG', level=i * 5), 'cls': i % 2})
    train = ShardDataset(find_shard_split(root, 'train').files, transform=lambda im: int(np.asarray(im)[0, 0, 0]),
                         cache_dir=tmp_path / 'index')
    seeded = SeededDataset(train, seed=0)
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            sampler = DistributedSampler(seeded, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
            sampler.set_epoch(epoch)
            loader = DataLoader(seeded, batch_size=4, sampler=list(sampler), num_workers=2)
            seen += [v for levels, _ in loader for v in levels.tolist()]
        assert sorted(seen) == [i * 5 for i in range(40)]
        orders.append(seen)
    assert orders[0] != orders[1]


# ------------------------------------------------------------------------------------------------ training
def test_train_validate_predict_from_shards(shards, tmp_path, capsys):
    assert main(_train_args(shards, tmp_path, 'run', '-j', '2', '--epochs', '1', '-b', '8', '--lr', '1e-3',
                            '--warmup-epochs', '0')) == 0
    run = tmp_path / 'run'
    results = json.loads((run / 'results.json').read_text())
    assert results['num_samples'] == 17 and set(results['per_class_accuracy']) == {'dark', 'bright'}
    capsys.readouterr()
    assert main(['validate', '--checkpoint', str(run), '-j', '0', '--no-progress']) == 0  # the run's own shards
    out = capsys.readouterr().out
    assert f'top-1 {results["top1"]:.2f}%' in out and '(17 images, 0 skipped)' in out
    assert main(['validate', '--checkpoint', str(run), '--split', 'train', '-j', '0']) == 2
    assert 'training shards' in capsys.readouterr().err
    assert main(['predict', '--checkpoint', str(run), '--data', str(shards), '--json', '--topk', '1']) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 17 and predictions[0]['image'].endswith('val-000000.tar:val/00000')
    assert predictions[0]['top'][0]['label'] in ('dark', 'bright')


def test_resume_after_sigkill_from_shards_gives_identical_weights(shards, tmp_path):
    """As for ImageFolders: N steps straight == killed mid-epoch (SIGKILL) + ``--resume RUN``, bit for bit, with two
    loader workers reading the shards."""
    common = ['-j', '2', '--epochs', '2', '-b', '4', '--checkpoint-steps', '2', '--mixup', '0.2', '--drop-path', '0.1',
              '--warmup-epochs', '1', '--lr', '1e-3']
    _run_cli(_train_args(shards, tmp_path, 'straight', *common))
    run = tmp_path / 'killed'
    kill_at_checkpoint(_train_args(shards, tmp_path, 'killed', *common), run, 'epoch-0001-step-00000004', ENV)
    _run_cli(['train', '--resume', str(run)])
    straight, resumed = _weights(tmp_path / 'straight'), _weights(run)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_two_gloo_processes_match_one_and_score_every_val_sample_once(shards, tmp_path):
    """torchrun, 2 ranks x batch 4 == 1 process x batch 8 (each training sample once per epoch, as one process sees
    them); the 17 val samples (odd) are each scored once."""
    common = ['-j', '1', '--epochs', '1', '--drop-path', '0', '--lr', '1e-3', '--warmup-epochs', '0',
              '--model-kwargs', 'stem=patch', '--smoothing', '0']
    _, evals = one_and_two_processes(_train_args, shards, tmp_path, common)
    assert evals[0]['num_samples'] == evals[1]['num_samples'] == 17
    assert evals[1]['top1'] == pytest.approx(evals[0]['top1']) and evals[1]['loss'] == pytest.approx(evals[0]['loss'])


def test_data_cache_api_and_sweep_take_shards(shards, tmp_path, monkeypatch):
    monkeypatch.setenv('CONV2FORMER_CACHE', str(tmp_path / 'dscache'))
    tiny = dict(model='conv2former_n', model_kwargs={'depths': [1, 1, 1, 1], 'dims': [8, 8, 16, 16]}, img_size=32,
                workers=0, progress=False, epochs=1, batch_size=8, warmup_epochs=0, output=str(tmp_path))
    cached = conv2former.train(data=str(shards), data_cache=True, experiment='cache', **tiny)
    assert (tmp_path / 'dscache' / 'tensor-cache').is_dir() and cached['val_top1'] is not None
    assert json.loads((tmp_path / 'cache' / 'results.json').read_text())['num_samples'] == 17
    plain = conv2former.train(data=f'{shards}/train/train-{{000000..000004}}.tar', experiment='api', **tiny)
    assert json.loads((Path(plain['run_dir']) / 'results.json').read_text())['num_samples'] == 17
    assert main(['sweep', '--grid', 'kernel_size=3', '--seeds', '0', '--epochs', '1', '--data', str(shards),
                 '--output', str(tmp_path), '--experiment', 'sweep', '--model-kwargs', 'depths=[1,1,1,1]',
                 'dims=[8,8,16,16]', '--img-size', '32', '-j', '0', '--no-progress', '-b', '8']) == 0
    assert (tmp_path / 'sweep' / 'sweep.csv').is_file()


# ------------------------------------------------------------------------------------------------ writing
def test_shards_command_writes_counts_names_and_refuses_to_overwrite(tmp_path, toy_images, capsys):
    tree = toy_images(tmp_path / 'tree', 9, 3)
    (tree / 'train' / 'dark' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 30)
    out = tmp_path / 'out'
    assert main(['shards', str(tree), str(out), '--shard-size', '5-images', '--no-progress']) == 0
    printed = capsys.readouterr().out
    assert 'train: 18 of 19 images in 4 shards (1 unreadable left out' in printed and 'val: 6 of 6' in printed
    assert (out / 'classes.txt').read_text() == 'bright\ndark\n'
    info = json.loads((out / '_info.json').read_text())
    assert info['splits']['train']['shard_lengths'] == [5, 5, 5, 3]
    # webdataset's own reader reads them (timm's reader is built on it)
    samples = list(wds.WebDataset(sorted(map(str, (out / 'train').glob('*.tar'))), shardshuffle=False))
    assert len(samples) == 18 and all({'png', 'cls', 'json'} <= set(s) for s in samples)
    train, val, names = build_shard_datasets(out)
    assert names == ['bright', 'dark'] and len(train) == 18 and len(val) == 6
    assert sorted(train.targets.tolist()) == [0] * 9 + [1] * 9  # the shuffle moved samples, not labels
    for argv, message in [(['shards', str(tree), str(out)], 'exists; pass --force'),
                          (['shards', str(tree), str(tmp_path / 'x'), '--shard-size', 'big'], 'expected a size'),
                          (['shards', str(tmp_path / 'nowhere'), str(tmp_path / 'x')], 'does not exist'),
                          (['shards', str(tree), str(tmp_path / 'x'), '--split', 'dev'], 'unknown split'),
                          (['shards', str(tree), str(tmp_path / 'x'), '--strict'], 'broken.png')]:
        assert main([*argv, '--no-progress']) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1, err
    assert not (tmp_path / 'x').exists()
    # shards from shards (re-sharding), then --force replaces OUT
    assert main(['shards', str(out), str(tmp_path / 'again'), '--shard-size', '1MB', '--no-progress']) == 0
    assert main(['shards', str(tree), str(out), '--force', '--split', 'val', '--no-progress']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['_info.json', 'classes.txt', 'val']


def test_ctrl_c_while_writing_shards_leaves_nothing_and_says_interrupted(tmp_path, toy_images, capsys, monkeypatch):
    """Ctrl-C in the middle of ``conv2former shards`` (after the first split): exit 130 with 'interrupted' (a bare
    KeyboardInterrupt has no message), no OUT and no temporary folder beside it; the same command then succeeds."""
    import conv2former.shards as shards
    tree = toy_images(tmp_path / 'tree', 4, 2)
    write_split, calls = shards._write_split, []

    def interrupted_after_one(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_split(*args, **kwargs)

    monkeypatch.setattr(shards, '_write_split', interrupted_after_one)
    out = tmp_path / 'out' / 'shards'
    assert main(['shards', str(tree), str(out), '--no-progress']) == 130
    assert capsys.readouterr().err.strip() == 'conv2former: interrupted'
    assert calls == ['train', 'val'] and list((tmp_path / 'out').iterdir()) == []
    monkeypatch.setattr(shards, '_write_split', write_split)
    assert main(['shards', str(tree), str(out), '--no-progress']) == 0 and (out / 'val').is_dir()
