"""conv2former sweep: grid parsing and bad grids refused before any run starts, a 2x2 sweep of 1-epoch tiny runs end
to end with its aggregate files, re-invoking skips finished runs, a killed sweep resumes, --report."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conv2former.cli import main
from conv2former.engine.state import list_checkpoints
from conv2former.sweep import parse_grid_arg

TINY = ['--model-kwargs', 'depths=[1,1,1,1]', '--model-kwargs', 'dims=[8,8,16,16]', '--img-size', '32', '-j', '0',
        '--no-progress', '--recipe', 'small', '--warmup-epochs', '0', '-b', '8']


@pytest.fixture(scope='module')
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('toy')
    rng = np.random.default_rng(0)
    for split, n in (('train', 16), ('val', 4)):
        for cls, base in (('dark', 60), ('bright', 190)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f'{i}.png')
    return root


def test_grid_values_are_parsed_as_yaml():
    assert parse_grid_arg('kernel_size=5,7,11') == ('kernel_size', [5, 7, 11])
    assert parse_grid_arg('fusion=mul,sum') == ('fusion', ['mul', 'sum'])
    assert parse_grid_arg('attn-act=true,false') == ('attn_act', [True, False])
    assert parse_grid_arg('depths=[1,1,2,1],[2,2,6,2]') == ('depths', [[1, 1, 2, 1], [2, 2, 6, 2]])
    assert parse_grid_arg('lr=1e-3,0.01') == ('lr', [1e-3, 0.01])


@pytest.mark.parametrize('grid, message', [
    ('kernel_size', 'expected KEY=V1,V2'),
    ('kernel_size=', "'kernel_size' has an empty value"),
    ('kernel_size=3,,5', "'kernel_size' has an empty value"),
    ('kernel_size=3,3', 'repeats a value'),
    ('seed=1,2', 'use --seeds'),
    ('model_kwargs=x', 'own grid keys'),
])
def test_malformed_grids_are_refused(grid, message):
    with pytest.raises(ValueError, match=message):
        parse_grid_arg(grid)


@pytest.mark.parametrize('grid, message', [
    ('kernel_sise=3,5', "unknown key 'kernel_sise' for model conv2former_n"),
    ('kernel_size=3,4', r'sweep variant kernel_size=4: model conv2former_n rejects .*kernel_size'),
    ('fusion=mul,prod', r"sweep variant fusion=prod: .*fusion must be one of"),
    ('lr=0.1,-1', r'sweep variant lr=-1: --lr: expected a number >= 0'),
    ('model=conv2former_n,convnext_nanoo', "unknown model 'convnext_nanoo'"),
    ('kernel_size=3 --seed 1', 'sets --seed per run; use --seeds'),
])
def test_bad_grids_fail_before_any_run_starts(tmp_path, toy, capsys, grid, message):
    grid, *extra = grid.split(' ')
    rc = main(['sweep', '--grid', grid, *extra, '--seeds', '0', '1', '--data', str(toy), '--output', str(tmp_path), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and __import__('re').search(message, err), err
    assert not list(tmp_path.rglob('config.yaml')), 'a run started before the grid was checked'


def _rows(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_by_two_sweep_end_to_end_then_skip_and_report(tmp_path, toy, capsys):
    argv = ['sweep', '--grid', 'kernel_size=3,5', '--seeds', '0', '1', '--epochs', '1', '--data', str(toy),
            '--output', str(tmp_path), '--experiment', 'k', *TINY]
    assert main(argv) == 0
    sweep = tmp_path / 'k'
    rows = _rows(sweep / 'sweep.csv')
    assert [(r['kernel_size'], r['seed']) for r in rows] == [('3', '0'), ('3', '1'), ('5', '0'), ('5', '1')]
    for r in rows:
        assert 0 <= float(r['final_top1']) <= 100 and float(r['best_top1']) >= float(r['final_top1'])
        assert int(r['params']) > 0 and int(r['macs']) > 0 and float(r['wall_seconds']) > 0
        assert float(r['train_img_per_sec']) > 0 and r['epochs'] == '1'
        assert (sweep / r['run'] / 'results.json').is_file() and (sweep / r['run'] / 'report.md').is_file()
        log = (sweep / r['run'] / 'log.txt').read_text()  # each run logs into its own log.txt only
        assert log.count('run folder:') == 1 and f'run folder: {sweep / r["run"]}' in log
    assert int(rows[2]['params']) > int(rows[0]['params'])  # 5x5 depthwise kernels hold more weights than 3x3
    md = (sweep / 'sweep.md').read_text()
    assert md.count('| 2/2 |') == 2 and 'top1_vs_kernel_size.png' in md
    assert (sweep / 'top1_vs_kernel_size.png').stat().st_size > 1000
    stamps = {r['run']: (sweep / r['run'] / 'results.json').stat().st_mtime_ns for r in rows}
    assert main(argv) == 0  # everything finished: nothing is trained again
    assert stamps == {r['run']: (sweep / r['run'] / 'results.json').stat().st_mtime_ns for r in rows}
    (sweep / 'sweep.md').unlink()
    capsys.readouterr()
    assert main(['sweep', '--report', str(sweep)]) == 0
    assert 'kernel_size=3' in capsys.readouterr().out and (sweep / 'sweep.md').is_file()
    rc = main([*argv[:-len(TINY)], *TINY[:-2], '-b', '4'])  # the same folder with other settings is refused
    assert rc == 2 and 'batch_size=8' in capsys.readouterr().err


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path, toy):
    argv = ['sweep', '--grid', 'fusion=mul,sum', '--seeds', '0', '--epochs', '2', '--checkpoint-steps', '1',
            '--data', str(toy), '--output', str(tmp_path), '--experiment', 'f', *TINY]
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-m', 'conv2former', *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    second = tmp_path / 'f' / 'fusion-sum_seed-0'
    deadline = time.time() + 600
    while not list_checkpoints(second):
        assert proc.poll() is None and time.time() < deadline, 'the sweep ended before it could be killed'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = tmp_path / 'f' / 'fusion-mul_seed-0'
    assert (first / 'results.json').is_file() and not (second / 'results.json').exists()
    stamp = (first / 'results.json').stat().st_mtime_ns
    assert main(argv) == 0
    assert (first / 'results.json').stat().st_mtime_ns == stamp  # the finished run was skipped
    assert 'resumed from' in (second / 'log.txt').read_text()
    rows = _rows(tmp_path / 'f' / 'sweep.csv')
    assert [r['fusion'] for r in rows] == ['mul', 'sum'] and all(r['epochs'] == '2' for r in rows)
    assert json.loads((second / 'sweep_run.json').read_text())['invocations'] == 1


SWEEPS = Path(__file__).resolve().parents[1] / 'experiments' / 'sweeps'


def _planned(preset: Path, toy: Path):
    from conv2former.cli import build_parser
    from conv2former.sweep.cli import _sweep_from_args
    from conv2former.sweep.runner import plan_runs, validate_runs
    args = build_parser().parse_args(['sweep', '--config', str(preset), '--data', str(toy)])
    sweep, folder = _sweep_from_args(args)
    runs = plan_runs(sweep, folder)
    return sweep, folder, runs, validate_runs(runs, sweep.task)  # every grid point's options and model, on meta


@pytest.mark.parametrize('preset', sorted(SWEEPS.glob('*.yaml')), ids=lambda p: p.stem)
def test_paper_presets_are_valid_sweeps(preset, toy):
    sweep, folder, runs, resolved = _planned(preset, toy)
    if preset.stem.startswith('cpu-'):  # the pre-registered CPU ablations (experiments/results/ablations-cpu)
        assert len(runs) == len(sweep.variants()) * 3 and folder == Path('runs/ablations-cpu')
        assert all(o.epochs == 3 and o.img_size == 96 and o.batch_size == 64 and o.data_cache
                   and o.model_kwargs['depths'] == [1, 1, 3, 1] for o in resolved.values())
    else:
        assert len(runs) == len(sweep.variants()) * 3 >= 6 and folder.parent == Path('runs')
        assert all(o.epochs == 20 and o.img_size == 128 and o.data_cache for o in resolved.values())


def test_cpu_ablation_presets_train_the_default_point_once(toy):
    """The four cpu-*.yaml presets share one sweep folder; the default point (mul, none, k7) has the same run names
    and the same settings in the fusion, weighting and kernel presets, so a later preset reuses those runs."""
    from conv2former.engine.options import as_dict
    plans = {}
    for preset in sorted(SWEEPS.glob('cpu-*.yaml')):
        _, _, runs, resolved = _planned(preset, toy)
        plans[preset.stem] = {r.name: as_dict(resolved[r.name]) for r in runs}
    assert sorted(plans) == ['cpu-convnext', 'cpu-fusion', 'cpu-kernel', 'cpu-weighting']
    default = [f'fusion-mul_weighting-none_kernel_size-7_seed-{s}' for s in range(3)]
    for name in default:
        assert plans['cpu-fusion'][name] == plans['cpu-weighting'][name] == plans['cpu-kernel'][name]
    assert len(set().union(*plans.values())) == 9 * 3  # 9 distinct grid points x 3 seeds


def test_parallel_runs_in_separate_processes(tmp_path, toy):
    argv = ['sweep', '--grid', 'kernel_size=3,5', '--seeds', '0', '--epochs', '1', '--parallel', '2', '--data',
            str(toy), '--output', str(tmp_path), '--experiment', 'p', *TINY]
    assert main(argv) == 0
    rows = _rows(tmp_path / 'p' / 'sweep.csv')
    assert [r['kernel_size'] for r in rows] == ['3', '5'] and all(r['final_top1'] for r in rows)
    for r in rows:
        assert (tmp_path / 'p' / r['run'] / 'log.txt').read_text().count('run folder:') == 1


def test_rows_read_metrics_csv_when_the_json_lines_are_gone(tmp_path):
    """Committed run records keep metrics.csv only: best top-1 and epochs come from it (the CPU ablations' seed-0
    runs once showed an empty best column that way, and the mean silently covered 2 of 3 seeds)."""
    import yaml
    from conv2former.sweep.aggregate import run_row
    run = tmp_path / 'r'
    run.mkdir()
    (run / 'config.yaml').write_text(yaml.safe_dump(dict(model='conv2former_n', img_size=32,
                                                         model_kwargs=dict(depths=[1, 1, 1, 1]))))
    (run / 'results.json').write_text(json.dumps(dict(top1=40.0, per_class_accuracy={'a': 1, 'b': 2})))
    (run / 'metrics.csv').write_text('epoch,step,lr,train_loss,img_per_sec,val_top1\n1,4,0.1,2.0,50.0,45.5\n'
                                     '2,8,0.01,1.5,70.0,\n3,12,0.001,1.2,60.0,40.0\n')
    row = run_row(tmp_path, dict(name='r', variant={}, seed=0), [])
    assert row['best_top1'] == 45.5 and row['final_top1'] == 40.0 and row['epochs'] == 3
    assert row['train_img_per_sec'] == 60.0


def _camvid(root: Path) -> Path:
    """A CamVid-layout tree of 64 px images, label 1 inside a bright square and 0 elsewhere."""
    rng = np.random.default_rng(0)
    for split, n in (('train', 4), ('val', 2)):
        (root / split).mkdir(parents=True)
        (root / f'{split}annot').mkdir()
        for i in range(n):
            x, y = (int(v) for v in rng.integers(4, 30, 2))
            image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            image[y:y + 28, x:x + 28] = (240, 240, 40)
            label = np.zeros((64, 64), np.uint8)
            label[y:y + 28, x:x + 28] = 1
            Image.fromarray(image).save(root / split / f'{split}{i}.png')
            Image.fromarray(label, mode='L').save(root / f'{split}annot' / f'{split}{i}.png')
    return root


def test_a_segmentation_sweep_folder_reports_miou(tmp_path):
    """The aggregate follows the task's best_metric: two real 1-epoch segmentation runs (lr 1e-3 / 2e-3, seed 0) in a
    sweep folder report mIoU (columns, sweep.md, plot), with params rebuilt from each run's task folder. (The runner
    plans model keywords into ``model_kwargs``, a classification option, so the runs are trained here directly.)"""
    from conv2former.api import train
    from conv2former.sweep import aggregate
    from conv2former.sweep.grid import build_sweep
    from conv2former.sweep.runner import plan_runs, write_sweep_file
    from conv2former.tasks import get_task
    options = dict(data=str(_camvid(tmp_path / 'camvid')), backbone='conv2former_n', crop_size=[64], epochs=1,
                   batch_size=2, decoder_channels=32, backbone_kwargs=dict(depths=[1, 1, 1, 1], dims=[16, 16, 32, 32]),
                   workers=0, progress=False, warmup_iters=1, overlays=0)
    sweep = build_sweep(['lr=0.001,0.002'], [0], options, get_task('segmentation')[1], task='segmentation')
    runs = plan_runs(sweep, tmp_path / 'seg')
    write_sweep_file(sweep, runs, tmp_path / 'seg')
    for run in runs:
        train('segmentation', **{k: v for k, v in run.options.items() if k != 'model_kwargs'})
    result = aggregate(tmp_path / 'seg')
    assert result['metric'].label == 'mIoU' and [e['n'] for e in result['summary']] == [1, 1]
    rows = _rows(tmp_path / 'seg' / 'sweep.csv')
    assert list(rows[0]) == ['lr', 'seed', 'best_mIoU', 'final_mIoU', 'params', 'macs', 'train_img_per_sec',
                             'wall_seconds', 'epochs', 'run']
    for r in rows:
        results = json.loads((tmp_path / 'seg' / r['run'] / 'results.json').read_text())
        assert float(r['final_mIoU']) == results['mIoU'] and float(r['best_mIoU']) == results['best_mIoU']
        assert int(r['params']) > 0 and r['macs'] == '' and r['epochs'] == '1'
    md = (tmp_path / 'seg' / 'sweep.md').read_text()
    assert '| final mIoU (%) | best mIoU (%) |' in md and 'top-1' not in md and md.count('| 1/1 |') == 2
    assert (tmp_path / 'seg' / 'mIoU_vs_lr.png').stat().st_size > 1000 and 'mIoU_vs_lr.png' in md


def test_detection_rows_report_box_ap(tmp_path):
    """Run folders of a detection sweep: the columns are best_bbox_AP / final_bbox_AP, best over metrics.jsonl and
    final from results.json; an unfinished run has empty metrics."""
    from conv2former.sweep.aggregate import run_row, summarize, sweep_metric
    metric = sweep_metric('detection')
    assert (metric.key, metric.best, metric.final, metric.label) == ('bbox_AP', 'best_bbox_AP', 'final_bbox_AP',
                                                                    'box AP')
    for name, finals in (('a', (10.0, 30.0, 20.0)), ('b', (5.0, 15.0))):
        run = tmp_path / name
        run.mkdir()
        (run / 'config.yaml').write_text('model: fasterrcnn\nbackbone: conv2former_n\n')
        (run / 'metrics.jsonl').write_text(''.join(json.dumps(dict(epoch=i + 1, bbox_AP=v, img_per_sec=4.0)) + '\n'
                                                   for i, v in enumerate(finals)))
        (run / 'results.json').write_text(json.dumps(dict(bbox_AP=finals[-1], best_bbox_AP=max(finals))))
    axes = [dict(key='lr', values=[0.1, 0.2, 0.3], target='option')]
    rows = [run_row(tmp_path, dict(name=n, variant=dict(lr=lr), seed=0), axes, metric)
            for n, lr in (('a', 0.1), ('b', 0.2), ('missing', 0.3))]
    assert [(r['best_bbox_AP'], r['final_bbox_AP'], r['epochs']) for r in rows] == [
        (30.0, 20.0, 3), (15.0, 15.0, 2), (None, None, None)]
    assert rows[0]['params'] is None  # no task folder (last/) to rebuild the detector from
    summary = summarize(rows, axes, metric)
    assert [(e['final_bbox_AP'], e['n']) for e in summary] == [(20.0, 1), (15.0, 1), (None, 0)]
