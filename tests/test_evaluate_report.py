"""Evaluation (metrics, DDP reduction, result files, confusion plot) and the training-run report."""
import csv
import json
import math
from datetime import timedelta

import matplotlib.image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conv2former.tasks.classification.evaluate import EvalResult, evaluate, save_confusion_matrix_png, write_results
from conv2former.engine.report import plot_training_curves, read_jsonl, write_report

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
NUM_CLASSES = 6
# (target, rank of the target among the logits, top-1 prediction); class 5 has no samples
SAMPLES = [(0, 0, 0), (0, 1, 2), (1, 0, 1), (1, 5, 3), (2, 0, 2), (3, 2, 0), (3, 0, 3), (4, 0, 4)]
# logits are a permutation of 0..5, so every sample's cross-entropy is logsumexp(0..5) - (5 - rank)
EXPECTED_LOSS = math.log(sum(map(math.exp, range(NUM_CLASSES)))) - 5 + sum(r for _, r, _ in SAMPLES) / len(SAMPLES)
EXPECTED = dict(top1=62.5, top5=87.5, per_class=[50.0, 50.0, 100.0, 50.0, 100.0, math.nan],
                confusion=[[1, 0, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0],
                           [1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])


def _logit_table() -> torch.Tensor:
    rows = []
    for target, rank, pred in SAMPLES:
        order = [c for c in range(NUM_CLASSES) if c not in (target, pred)]
        order.insert(0, pred)
        if rank:
            order.insert(rank, target)
        row = torch.empty(NUM_CLASSES)
        row[order] = torch.arange(NUM_CLASSES - 1, -1, -1, dtype=torch.float)
        rows.append(row)
    return torch.stack(rows)


class LookupModel(nn.Module):
    """Images carry their sample index; logits come from a fixed table via a matmul (so autocast applies)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer('table', table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x[:, 0, 0, 0].round().long()
        return F.one_hot(index, self.table.shape[0]).to(x.dtype) @ self.table


def _loader(indices, batch_size: int = 3) -> DataLoader:
    images = torch.tensor(indices, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    targets = torch.tensor([SAMPLES[i][0] for i in indices])
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size)


def _check_expected(result: EvalResult, loss_tol: float = 1e-6):
    assert result.num_samples == len(SAMPLES)
    assert result.top1 == pytest.approx(EXPECTED['top1'])
    assert result.top5 == pytest.approx(EXPECTED['top5'])
    assert result.loss == pytest.approx(EXPECTED_LOSS, abs=loss_tol)
    assert result.per_class_accuracy[:-1] == pytest.approx(EXPECTED['per_class'][:-1])
    assert math.isnan(result.per_class_accuracy[-1])
    assert result.confusion.dtype == torch.int64
    assert result.confusion.tolist() == EXPECTED['confusion']


def test_logit_table_is_what_the_samples_say():
    table = _logit_table()
    for (target, rank, pred), row in zip(SAMPLES, table):
        assert row.argmax() == pred and (row > row[target]).sum() == rank


@pytest.mark.parametrize('train_mode', [True, False])
def test_evaluate_hand_computed(train_mode):
    model = LookupModel(_logit_table()).train(train_mode)
    result = evaluate(model, _loader(range(len(SAMPLES))), 'cpu', NUM_CLASSES, progress=False)
    _check_expected(result)
    assert model.training is train_mode


def test_evaluate_bf16_channels_last_and_progress():
    model = LookupModel(_logit_table()).train()
    # distributed=True without an initialized process group evaluates locally
    result = evaluate(model, _loader(range(len(SAMPLES))), torch.device('cpu'), NUM_CLASSES,
                      amp_dtype=torch.bfloat16, channels_last=True, distributed=True, progress=True)
    _check_expected(result, loss_tol=1e-2)
    assert model.training


def test_evaluate_fewer_than_five_classes():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]])
    targets = torch.tensor([0, 2, 0, 1])
    model = LookupModel(logits)
    images = torch.arange(4, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    result = evaluate(model, DataLoader(TensorDataset(images, targets), batch_size=4), 'cpu', 3, progress=False)
    assert result.top1 == pytest.approx(50.0)
    assert result.top5 == pytest.approx(100.0)  # top-3 of 3 classes
    assert result.per_class_accuracy == pytest.approx([50.0, 100.0, 0.0])
    assert result.loss == pytest.approx(F.cross_entropy(logits, targets).item())


def test_evaluate_restores_mode_on_error():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError('boom')

    model = Broken().train()
    with pytest.raises(RuntimeError, match='boom'):
        evaluate(model, _loader([0]), 'cpu', NUM_CLASSES, progress=False)
    assert model.training


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        shard = [range(0, 5), range(5, len(SAMPLES))][rank]  # unequal shards
        result = evaluate(LookupModel(_logit_table()), _loader(list(shard)), 'cpu', NUM_CLASSES,
                          distributed=True, progress=False)
        payload = dict(top1=result.top1, top5=result.top5, loss=result.loss, num_samples=result.num_samples,
                       per_class=result.per_class_accuracy, confusion=result.confusion.tolist())
        with open(f'{out_dir}/rank{rank}.json', 'w') as f:
            json.dump(payload, f)
    finally:
        dist.destroy_process_group()


def test_evaluate_distributed_all_reduces(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f'rank{rank}.json').read_text())
        result = EvalResult(got['top1'], got['top5'], got['loss'], got['num_samples'], got['per_class'],
                            torch.tensor(got['confusion']))
        _check_expected(result)


@pytest.mark.parametrize('num_classes', [3, 120])
def test_confusion_matrix_png(tmp_path, num_classes):
    confusion = torch.randint(0, 20, (num_classes, num_classes))
    confusion[-1] = 0  # a class without samples must not divide by zero
    names = [f'class_{i}_with_a_rather_long_name' for i in range(num_classes)]
    path = save_confusion_matrix_png(confusion, names, tmp_path / 'cm' / 'confusion_matrix.png')
    assert path == tmp_path / 'cm' / 'confusion_matrix.png'
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert image.ndim == 3 and 300 <= height <= 4000 and height <= width <= 1.6 * height
    assert [p.name for p in path.parent.iterdir()] == ['confusion_matrix.png']  # no temp file left


def test_confusion_matrix_png_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError, match='class names'):
        save_confusion_matrix_png(torch.zeros(3, 3, dtype=torch.long), ['a', 'b'], tmp_path / 'cm.png')


def _result() -> EvalResult:
    return EvalResult(top1=62.5, top5=87.5, loss=0.75, num_samples=8, per_class_accuracy=[50.0, 100.0, math.nan],
                      confusion=torch.zeros(3, 3, dtype=torch.long))


def test_write_results_json_and_csv(tmp_path):
    extra = dict(model='conv2former_n', img_size=224, crop_pct=0.95, checkpoint=None, tags=['a'])
    json_path, csv_path = tmp_path / 'out' / 'results.json', tmp_path / 'out' / 'results.csv'
    write_results(_result(), ['cat', 'dog', 'eel'], json_path=json_path, csv_path=csv_path, extra=extra)
    data = json.loads(json_path.read_text())
    assert list(data) == ['top1', 'top1_err', 'top5', 'top5_err', 'loss', 'num_samples', 'skipped_images', 'model',
                          'img_size', 'crop_pct', 'checkpoint', 'tags', 'per_class_accuracy']
    assert data['top1'] == 62.5 and data['top1_err'] == 37.5 and data['top5'] == 87.5 and data['top5_err'] == 12.5
    assert data['loss'] == 0.75 and data['num_samples'] == 8 and data['model'] == 'conv2former_n'
    assert data['tags'] == ['a'] and data['checkpoint'] is None
    assert data['per_class_accuracy'] == {'cat': 50.0, 'dog': 100.0, 'eel': None}  # nan -> null (valid JSON)
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    assert list(rows[0]) == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'loss', 'num_samples',
                             'skipped_images', 'img_size', 'crop_pct', 'checkpoint']  # non-scalar extras stay in the JSON only
    assert rows[0]['model'] == 'conv2former_n' and float(rows[0]['top1']) == 62.5 and rows[0]['img_size'] == '224'
    assert sorted(p.name for p in json_path.parent.iterdir()) == ['results.csv', 'results.json']


def test_write_results_without_names_or_files(tmp_path):
    assert _result().as_dict()['per_class_accuracy'] == [50.0, 100.0, None]
    with pytest.raises(ValueError, match='class names'):
        _result().as_dict(['only_one'])
    write_results(_result(), ['a', 'b', 'c'])  # neither path: nothing to do
    write_results(_result(), ['a', 'b', 'c'], csv_path=tmp_path / 'r.csv')
    header = 'top1,top1_err,top5,top5_err,loss,num_samples,skipped_images'
    assert (tmp_path / 'r.csv').read_text().splitlines()[0] == header


def _write_run(run_dir, epochs: int, ema: bool = True, truncate: bool = True):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in range(epochs):
        lines.append(json.dumps(dict(
            epoch=e, step=10 * (e + 1), lr=1e-3 / (e + 1), train_loss=2.0 - 0.5 * e,
            val_loss=None if e == 0 else 2.5 - 0.5 * e,
            val_top1=None if e == 0 else 40.0 + 10 * e, val_top5=None if e == 0 else 70.0 + 5 * e,
            ema_top1=(35.0 + 10 * e) if ema and e else None, epoch_time=12.5, img_per_sec=1234.5)))
    if truncate:
        lines.append('{"epoch": %d, "step": 40, "lr": 0.00' % epochs)  # killed mid-write
    (run_dir / 'metrics.jsonl').write_text('\n'.join(lines))
    steps = [json.dumps(dict(step=s, lr=1e-3 * s / 30)) for s in range(1, 10 * epochs + 1)]
    (run_dir / 'lr_schedule.jsonl').write_text('\n'.join(steps + (['{"step": 31, "l'] if truncate else [])) + '\n')


def test_read_jsonl(tmp_path):
    _write_run(tmp_path, 3)
    records = read_jsonl(tmp_path / 'metrics.jsonl')
    assert [r['epoch'] for r in records] == [0, 1, 2] and records[0]['val_loss'] is None
    assert len(read_jsonl(tmp_path / 'lr_schedule.jsonl')) == 30
    # line 2: a resumed run appended to a cut line; line 3: not an object
    (tmp_path / 'bad.jsonl').write_text('{"a": 1}\n{"a": {"a": 2}\n[3]\n\n{"a": 4}\n')
    with pytest.warns(UserWarning) as record:
        assert read_jsonl(tmp_path / 'bad.jsonl') == [{'a': 1}, {'a': 4}]
    assert [str(w.message).split('bad.jsonl:')[1][:2] for w in record] == ['2:', '3:']


def test_resumed_run_keeps_the_last_record_per_epoch(tmp_path):
    _write_run(tmp_path, 3, truncate=False)
    redone = dict(epoch=1, step=20, lr=5e-4, train_loss=1.25, val_loss=1.75, val_top1=52.0, val_top5=77.0,
                  ema_top1=None, epoch_time=12.0, img_per_sec=999.0)
    with open(tmp_path / 'metrics.jsonl', 'a') as f:
        f.write('\n' + json.dumps(redone) + '\n')
    text = write_report(tmp_path, {}, {}).read_text()
    rows = [line for line in text.split('## Per-epoch metrics')[1].splitlines() if line.startswith('| ')]
    assert [r.split(' | ')[0] for r in rows] == ['| epoch', '| 0', '| 1', '| 2']
    assert '| 1 | 1.2500 | 1.7500 | 52.00 | 77.00 | – | 5.000e-04 | 999.0 |' in rows


def test_plot_training_curves(tmp_path):
    _write_run(tmp_path, 3)
    paths = plot_training_curves(tmp_path)
    assert paths == {name: tmp_path / 'plots' / f'{name}.png' for name in ('loss', 'accuracy', 'lr')}
    for path in paths.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(path).shape[:2] == (450, 700)


def test_plot_training_curves_without_data(tmp_path):
    assert plot_training_curves(tmp_path) == {}
    assert not (tmp_path / 'plots').exists()


def test_write_report(tmp_path):
    _write_run(tmp_path, 3)
    save_confusion_matrix_png(torch.eye(3, dtype=torch.long), ['a', 'b', 'c'], tmp_path / 'confusion_matrix.png')
    config = dict(model='conv2former_n', lr=1e-3, epochs=3, data=dict(path='/data/in|1k', img_size=224),
                  notes='x' * 200)
    path = write_report(tmp_path, config, dict(top1=60.0, top5=80.0, best_epoch=2), title='My run')
    assert path == tmp_path / 'report.md'
    text = path.read_text()
    assert text.startswith('# My run\n')
    config_section = text.split('## Configuration')[1].split('## Final metrics')[0]
    keys = [line.split(' | ')[0][2:] for line in config_section.splitlines() if line.startswith('| ')]
    assert keys == ['key', 'data.img_size', 'data.path', 'epochs', 'lr', 'model', 'notes']  # sorted, nested dotted
    assert '| data.path | /data/in\\|1k |' in text and '| lr | 0.001 |' in text
    assert '| notes | ' + 'x' * 79 + '… |' in text
    assert '| top1 | 60 |' in text and '| best_epoch | 2 |' in text
    assert '| epoch | train loss | val loss | top-1 | top-5 | EMA top-1 | lr | img/s |' in text
    assert '| 0 | 2.0000 | – | – | – | – | 1.000e-03 | 1234.5 |' in text
    assert '| 2 | 1.0000 | 1.5000 | 60.00 | 80.00 | 55.00 | 3.333e-04 | 1234.5 |' in text
    assert not any(line.startswith('| 3 | ') for line in text.splitlines())  # the truncated line was skipped
    for name in ('loss', 'accuracy', 'lr'):
        assert f'![{name}](plots/{name}.png)' in text and (tmp_path / 'plots' / f'{name}.png').is_file()
    assert '![confusion matrix](confusion_matrix.png)' in text


def test_write_report_single_epoch_without_ema(tmp_path):
    _write_run(tmp_path, 1, ema=False, truncate=False)
    text = write_report(tmp_path, {}, {}).read_text()
    assert text.startswith('# Conv2Former training run\n')
    assert 'EMA top-1' not in text and '_No configuration recorded._' in text
    assert '| 0 | 2.0000 | – | – | – | 1.000e-03 | 1234.5 |' in text
    assert '![loss](plots/loss.png)' in text and '![lr](plots/lr.png)' in text
    assert '![accuracy]' not in text and 'confusion_matrix.png' not in text  # no val accuracy, no confusion matrix
