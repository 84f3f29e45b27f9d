"""Dense metrics and overlays: mIoU and COCO AP against hand-computed values, distributed merging, overlay PNGs."""
from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conv2former.tasks.detection.metrics import CocoEvaluator
from conv2former.tasks.segmentation.metrics import SegmentationMetric
from conv2former.visualize import (_GAP, _LEGEND_ROW, _TITLE_HEIGHT, detection_overlay, palette,
                                         segmentation_overlay)

COCO128 = Path(__file__).resolve().parents[2] / 'shared/datasets/coco128.tar.gz'
I = 255  # ignore index
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # pycocotools' decode


# ------------------------------------------------------------------------------------------------ SegmentationMetric
TARGET = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, I, I],
                       [2, 2, 2, I]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [0, 0, 1, 2],
                     [2, 0, 0, 1],
                     [2, 2, 2, 2]])
# (gt, pred) over the 13 labelled pixels: gt 0 → pred 0,1,0,0; gt 1 → 1,1,1,2; gt 2 → 2,0,2,2,2
CONFUSION = [[3, 1, 0],
             [0, 3, 1],
             [1, 0, 4]]


def test_segmentation_metric_hand_computed():
    metric = SegmentationMetric(3, ignore_index=I)
    metric.update(PRED, TARGET)
    result = metric.compute()
    assert result['confusion'].tolist() == CONFUSION
    assert result['confusion'].dtype == torch.int64
    # IoU = TP / (GT + predicted - TP): class 0: 3 / (4 + 4 - 3), class 1: 3 / (4 + 4 - 3), class 2: 4 / (5 + 5 - 4)
    iou = [3 / 5, 3 / 5, 4 / 6]
    assert result['per_class_iou'] == pytest.approx([100 * v for v in iou])
    assert result['mIoU'] == pytest.approx(100 * sum(iou) / 3)  # 62.22
    assert result['per_class_acc'] == pytest.approx([75.0, 75.0, 80.0])  # recall: 3/4, 3/4, 4/5
    assert result['mean_acc'] == pytest.approx(100 * (0.75 + 0.75 + 0.8) / 3)
    assert result['pixel_acc'] == pytest.approx(100 * 10 / 13)  # 3 + 3 + 4 correct of 13 labelled


def test_segmentation_metric_accumulates_batches_and_resets():
    metric = SegmentationMetric(3, ignore_index=I)
    metric.update(torch.stack([PRED, PRED]), torch.stack([TARGET, TARGET]))  # [N, H, W]
    metric.update(PRED.to(torch.uint8), TARGET.to(torch.uint8))  # [H, W], other integer dtype
    assert metric.compute()['confusion'].tolist() == [[3 * v for v in row] for row in CONFUSION]
    metric.reset()
    assert metric.compute()['confusion'].sum() == 0
    assert metric.compute()['mIoU'] is None and metric.compute()['pixel_acc'] is None


def test_segmentation_metric_absent_classes():
    metric = SegmentationMetric(5, ignore_index=I)
    pred = PRED.clone()
    pred[3, 3] = 4  # an ignored pixel: does not count
    pred[0, 0] = 3  # class 3 predicted on a class-0 pixel, never in the GT
    metric.update(pred, TARGET)
    result = metric.compute()
    # class 0: TP 2, GT 4, predicted 3 → 2 / 5; class 3: TP 0, union 1 → 0; class 4: no GT, no prediction → None
    iou = [2 / 5, 3 / 5, 4 / 6, 0.0]
    assert result['per_class_iou'][:4] == pytest.approx([100 * v for v in iou])
    assert result['per_class_iou'][4] is None
    assert result['mIoU'] == pytest.approx(100 * sum(iou) / 4)  # class 4 left out of the mean
    assert result['per_class_acc'][3] is None and result['per_class_acc'][4] is None  # no GT pixels: recall undefined
    assert result['mean_acc'] == pytest.approx(100 * (2 / 4 + 3 / 4 + 4 / 5) / 3)


def test_segmentation_metric_bad_input():
    metric = SegmentationMetric(3, ignore_index=I)
    with pytest.raises(ValueError, match=r'\(2, 4, 4\).*\(4, 4\)'):
        metric.update(torch.stack([PRED, PRED]), TARGET)
    bad_target = TARGET.clone()
    bad_target[0, 0], bad_target[0, 1] = 7, -1
    with pytest.raises(ValueError, match=r'target has values \[-1, 7\]; expected 0..2 or ignore_index 255'):
        metric.update(PRED, bad_target)
    bad_pred = PRED.clone()
    bad_pred[0, 0] = 3
    with pytest.raises(ValueError, match=r'prediction has values \[3\]'):
        metric.update(bad_pred, TARGET)
    with pytest.raises(ValueError, match='integer label map.*float32'):
        metric.update(PRED.float(), TARGET)
    assert metric.compute()['confusion'].sum() == 0  # nothing half-added


# ------------------------------------------------------------------------------------------------------- COCO AP
SIZE = 100  # both images are 100 x 100


def _rect_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _coco_gt() -> COCO:
    """2 images, 2 categories; image 1: person A, dog B and a crowd of people C; image 2: person D. All objects are
    'medium' (32² < area < 96²): APs and APl are undefined."""
    crowd = np.zeros((SIZE, SIZE), dtype=np.uint8)
    crowd[70:100, 0:40] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle['counts'] = crowd_rle['counts'].decode('ascii')
    anns = [
        dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 40, 40], area=1600, iscrowd=0,
             segmentation=_rect_polygon(10, 10, 40, 40)),
        dict(id=2, image_id=1, category_id=2, bbox=[60, 20, 30, 60], area=1800, iscrowd=0,
             segmentation=_rect_polygon(60, 20, 30, 60)),
        dict(id=3, image_id=1, category_id=1, bbox=[0, 70, 40, 30], area=1200, iscrowd=1, segmentation=crowd_rle),
        dict(id=4, image_id=2, category_id=1, bbox=[20, 20, 60, 60], area=3600, iscrowd=0,
             segmentation=_rect_polygon(20, 20, 60, 60)),
    ]
    coco = COCO()
    coco.dataset = dict(images=[dict(id=i, width=SIZE, height=SIZE, file_name=f'{i}.jpg') for i in (1, 2)],
                        categories=[dict(id=1, name='person'), dict(id=2, name='dog')], annotations=anns)
    coco.createIndex()
    return coco


def _prediction(boxes, scores, labels, mask_rows=None) -> dict:
    """torchvision-style output; masks are 0.9 inside the box (or rows ``mask_rows`` of it) and 0.2 outside."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.full((len(boxes), 1, SIZE, SIZE), 0.2)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        rows = mask_rows or (y1, y2)
        mask[0, rows[0]:rows[1], x1:x2] = 0.9
    return dict(boxes=boxes, scores=torch.tensor(scores), labels=torch.tensor(labels, dtype=torch.int64), masks=masks)


PERFECT = {
    # the crowd region (person, score 0.95) matches crowd C: ignored, neither a true nor a false positive
    1: _prediction([[10, 10, 50, 50], [60, 20, 90, 80], [0, 70, 40, 100]], [0.9, 0.8, 0.95], [1, 2, 1]),
    2: _prediction([[20, 20, 80, 80]], [0.7], [1]),
}


def test_coco_perfect_predictions(capsys):
    coco = _coco_gt()
    assert (coco.annToMask(coco.anns[1]) == (PERFECT[1]['masks'][0, 0] > 0.5).numpy()).all()  # same pixels
    capsys.readouterr()
    evaluator = CocoEvaluator(coco)
    evaluator.update(PERFECT)
    summary = evaluator.summarize()
    for iou_type in ('bbox', 'segm'):
        assert summary[iou_type] == dict(AP=100.0, AP50=100.0, AP75=100.0, APs=None, APm=100.0, APl=None,
                                         per_class={1: 100.0, 2: 100.0})
        assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000' in \
            evaluator.summary_text[iou_type]
    assert capsys.readouterr().out == ''  # pycocotools' printing is captured


def test_coco_partial_overlap_only_updated_images():
    # image 2 only (image 1's objects are not counted as missed). Box IoU with D (20, 20, 80, 80):
    # (20, 20, 80, 57.5) lies inside it, 60 x 37.5 = 2250 / 3600 = 0.625; mask rows 20-57: 60 x 38 = 2280 / 3600 =
    # 0.633. Both match at IoU thresholds .50, .55, .60 (3 of 10) with precision 1 → AP = 30, AP50 = 100, AP75 = 0.
    evaluator = CocoEvaluator(_coco_gt())
    evaluator.update({2: _prediction([[20, 20, 80, 57.5]], [0.9], [1], mask_rows=(20, 58))})
    assert evaluator.img_ids == [2]
    for iou_type, result in evaluator.summarize().items():
        assert result == dict(AP=30.0, AP50=100.0, AP75=0.0, APs=None, APm=30.0, APl=None,
                              per_class={1: 30.0, 2: None}), iou_type  # no dog in image 2: undefined


def test_coco_false_positive_ranked_first():
    # person: detections by score: A 0.9 (TP), FP 0.8, D 0.7 (TP); 2 GT. Recall after each: 1/2, 1/2, 1;
    # precision: 1, 1/2, 2/3 → made monotone from the right: 1, 2/3, 2/3. Of the 101 recall points 0, .01, ..., 1,
    # the 51 up to 0.50 take precision 1 and the 50 above it 2/3: AP = (51 + 50 * 2/3) / 101 = 83.50 %.
    # dog: FP 0.95 then B 0.6 (TP); 1 GT. Precision at recall 1 is 1/2, for all 101 points: AP = 50 %.
    # Every match is exact (IoU 1), so each IoU threshold gives the same; AP = mean over classes = 66.75 %.
    predictions = {
        1: _prediction([[10, 10, 50, 50], [60, 20, 90, 80]], [0.9, 0.6], [1, 2]),
        2: _prediction([[20, 20, 80, 80], [82, 0, 100, 100], [0, 82, 80, 100]], [0.7, 0.8, 0.95], [1, 1, 2]),
    }
    evaluator = CocoEvaluator(_coco_gt(), iou_types=('bbox',))
    evaluator.update(predictions)
    result = evaluator.summarize()['bbox']
    person, dog = 100 * (51 + 50 * 2 / 3) / 101, 50.0
    assert result['per_class'] == {1: round(person, 2), 2: dog}
    mean = round((person + dog) / 2, 2)
    assert result == dict(AP=mean, AP50=mean, AP75=mean, APs=None, APm=mean, APl=None, per_class=result['per_class'])


def test_coco_no_predictions(caplog):
    empty = dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64),
                 masks=torch.zeros(0, 1, SIZE, SIZE))
    evaluator = CocoEvaluator(_coco_gt())
    evaluator.update({1: empty, 2: empty})
    with caplog.at_level(logging.WARNING, logger='conv2former.tasks.detection.metrics'):
        summary = evaluator.summarize()
    assert 'no predictions on the 2 evaluated images' in caplog.text
    for iou_type in ('bbox', 'segm'):  # zeros where there is ground truth, still None where there is none
        assert summary[iou_type] == dict(AP=0.0, AP50=0.0, AP75=0.0, APs=None, APm=0.0, APl=None,
                                         per_class={1: 0.0, 2: 0.0})


def test_coco_float_labels_and_replacement():
    # engines may hand labels over as floats; a second update of an image replaces the first
    evaluator = CocoEvaluator(_coco_gt(), iou_types='bbox')
    evaluator.update({2: dict(PERFECT[2], boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]))})
    evaluator.update({2: dict(PERFECT[2], labels=PERFECT[2]['labels'].float())})
    assert evaluator.summarize()['bbox']['AP'] == 100.0


def test_coco_bad_input():
    coco = _coco_gt()
    with pytest.raises(ValueError, match="iou_types"):
        CocoEvaluator(coco, iou_types=('keypoints',))
    evaluator = CocoEvaluator(coco)
    with pytest.raises(ValueError, match='nothing to evaluate'):
        evaluator.summarize()
    with pytest.raises(ValueError, match='image_id 7 is not in the ground truth'):
        evaluator.update({7: PERFECT[2]})
    with pytest.raises(ValueError, match=r'labels \[3\] that are no ground-truth category'):
        evaluator.update({2: dict(PERFECT[2], labels=torch.tensor([3]))})
    with pytest.raises(ValueError, match="no masks"):
        evaluator.update({2: {k: v for k, v in PERFECT[2].items() if k != 'masks'}})
    with pytest.raises(ValueError, match=r'masks for image 2 have shape \(1, 1, 50, 100\); expected \[1, 1, 100, 1'):
        evaluator.update({2: dict(PERFECT[2], masks=torch.zeros(1, 1, 50, SIZE))})
    with pytest.raises(ValueError, match=r'boxes \(1, 3\)'):
        evaluator.update({2: dict(PERFECT[2], boxes=torch.zeros(1, 3))})
    assert evaluator.img_ids == []


def _distributed_worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{folder}/store', rank=rank, world_size=world_size)
    try:
        evaluator = CocoEvaluator(_coco_gt(), iou_types=('bbox',))
        empty = dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64))
        evaluator.update({1: PERFECT[1]} if rank == 0 else {2: empty})
        evaluator.synchronize()
        metric = SegmentationMetric(3, ignore_index=I)
        metric.update(PRED if rank == 0 else TARGET, TARGET)
        metric.synchronize()
        result = dict(img_ids=evaluator.img_ids, confusion=metric.compute()['confusion'].tolist())
        if rank == 0:
            result['summary'] = evaluator.summarize()['bbox']
        Path(folder, f'rank{rank}.json').write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_distributed_synchronize(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert rank0['img_ids'] == [1, 2] and rank1['img_ids'] == [2]  # rank 0 merged rank 1's image
    # person: A found, D (image 2, from rank 1) missed → precision 1 up to recall 1/2: 51 of 101 points; dog: 100
    person = 100 * 51 / 101
    assert rank0['summary']['per_class'] == {'1': round(person, 2), '2': 100.0}
    assert rank0['summary']['AP'] == pytest.approx((person + 100) / 2, abs=0.01)
    perfect = [[4, 0, 0], [0, 4, 0], [0, 0, 5]]  # rank 1 predicted the target itself
    summed = [[a + b for a, b in zip(r, s)] for r, s in zip(CONFUSION, perfect)]
    assert rank0['confusion'] == summed and rank1['confusion'] == summed


@pytest.mark.skipif(not COCO128.is_file(), reason=f'COCO128 archive not found at {COCO128}')
def test_coco128_ground_truth_as_predictions():
    """Real annotations (80 classes, polygons, crowds) fed back as predictions score AP 100 for boxes and masks."""
    with tarfile.open(COCO128, 'r:gz') as tar:
        member = tar.extractfile('coco128/annotations/instances_train2017.json')
        dataset = json.load(member)
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    evaluator = CocoEvaluator(coco)
    for image_id in sorted(coco.imgs)[:40]:
        anns = [a for a in coco.imgToAnns[image_id] if not a['iscrowd']]
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        info = coco.imgs[image_id]
        masks = torch.zeros(len(anns), 1, info['height'], info['width'])
        for mask, ann in zip(masks, anns):
            mask[0] = torch.from_numpy(coco.annToMask(ann)).float()
        evaluator.update({image_id: dict(boxes=boxes, scores=torch.linspace(0.9, 0.5, len(anns)),
                                         labels=torch.tensor([a['category_id'] for a in anns]), masks=masks)})
    summary = evaluator.summarize()
    for iou_type in ('bbox', 'segm'):
        assert summary[iou_type]['AP'] == 100.0 and summary[iou_type]['AP50'] == 100.0
        assert all(v in (100.0, None) for v in summary[iou_type]['per_class'].values())


# ------------------------------------------------------------------------------------------------------- overlays
def test_palette():
    assert palette(5) == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert len(set(palette(256))) == 256 and palette(300)[:256] == palette(256)
    with pytest.raises(ValueError, match='>= 0'):
        palette(-1)


def _pixel(png: Path, x: int, y: int) -> tuple:
    return Image.open(png).convert('RGB').getpixel((x, y))


def test_detection_overlay(tmp_path):
    height, width = 64, 80
    image = torch.full((3, height, width), 100, dtype=torch.uint8)
    names = ['background', 'person', 'dog']
    dog = palette(3)[2]  # (0, 128, 0)
    masks = torch.zeros(2, 1, height, width)
    masks[0, 0, 10:50, 10:40] = 0.8
    masks[1, 0, 5:30, 50:70] = 0.8
    prediction = dict(boxes=torch.tensor([[10.0, 10, 40, 50], [50, 5, 70, 30]]), scores=torch.tensor([0.9, 0.3]),
                      labels=torch.tensor([2.0, 1.0]), masks=masks)  # the person (score 0.3) is below threshold
    gt_masks = torch.zeros(1, height, width, dtype=torch.uint8)
    gt_masks[0, 12:52, 12:42] = 1
    target = dict(boxes=torch.tensor([[12.0, 12, 42, 52]]), labels=torch.tensor([2]), masks=gt_masks)
    png = detection_overlay(image, prediction, target, names, tmp_path / 'sub' / 'det.png')
    assert png == tmp_path / 'sub' / 'det.png'
    with Image.open(png) as im:
        assert im.format == 'PNG' and im.size == (2 * width + _GAP, _TITLE_HEIGHT + height)
    right = width + _GAP  # the prediction panel's left edge
    assert _pixel(png, right + 10, _TITLE_HEIGHT + 30) == dog  # box outline
    assert _pixel(png, right + 25, _TITLE_HEIGHT + 40) == tuple((100 + c) // 2 for c in dog)  # mask blended 50 %
    assert _pixel(png, right + 60, _TITLE_HEIGHT + 20) == (100, 100, 100)  # low-score detection not drawn
    assert _pixel(png, 12, _TITLE_HEIGHT + 30) == dog  # ground-truth box
    assert _pixel(png, 11, _TITLE_HEIGHT + 30) == (100, 100, 100)
    title = np.asarray(Image.open(png).convert('L'))[:_TITLE_HEIGHT]
    assert (title[:, :width] < 128).any() and (title[:, right:] < 128).any()  # both panels titled
    assert list(tmp_path.joinpath('sub').iterdir()) == [png]  # no temporary file left behind

    alone = detection_overlay(image, prediction, None, names, tmp_path / 'pred.png')
    with Image.open(alone) as im:
        assert im.size == (width, _TITLE_HEIGHT + height)
    with pytest.raises(ValueError, match='label 2 has no name'):
        detection_overlay(image, prediction, None, names[:2], tmp_path / 'x.png')
    with pytest.raises(ValueError, match=r'uint8 tensor \[3, H, W\], got torch.float32'):
        detection_overlay(image.float(), prediction, None, names, tmp_path / 'x.png')
    assert not (tmp_path / 'x.png').exists()


def test_segmentation_overlay(tmp_path):
    height, width = 32, 96
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    names = ['road', 'sky', 'car', 'bike']  # bike appears nowhere
    colours = palette(4)
    target = torch.zeros(height, width, dtype=torch.int64)
    target[:, 48:] = 1
    target[:8, :] = I
    prediction = torch.zeros(height, width, dtype=torch.int64)
    prediction[16:, 60:] = 2
    png = segmentation_overlay(image, prediction, target, names, tmp_path / 'seg.png', ignore_index=I, alpha=0.35)
    with Image.open(png) as im:
        assert im.format == 'PNG' and im.size == (3 * width + 2 * _GAP, _TITLE_HEIGHT + height + _LEGEND_ROW)
    pixels = np.asarray(Image.open(png).convert('RGB')).astype(np.int64)
    original = image.permute(1, 2, 0).numpy().astype(np.int64)
    top = _TITLE_HEIGHT
    panel = [pixels[top:top + height, i * (width + _GAP):i * (width + _GAP) + width] for i in range(3)]
    assert (panel[0] == original).all()  # the image panel is the image
    # ignored rows exactly unchanged: at alpha 0.35 a plain blend of a pixel with itself, x * 0.65 + x * 0.35 in
    # float32, truncates 22 of the 256 values to x - 1
    assert (panel[1][:8] == original[:8]).all()
    blend = original * 0.65 + np.array(colours[1]) * 0.35  # sky in the ground truth (the blend is truncated)
    assert (np.abs(panel[1][8:, 48:] - blend[8:, 48:]) <= 1).all()
    car = original[20, 70] * 0.65 + np.array(colours[2]) * 0.35
    assert (np.abs(panel[2][20, 70] - car) <= 1).all()  # the predicted car pixel has the car colour blended in
    assert (np.abs(panel[2][:8] - original[:8]) > 1).any()  # the prediction panel colours every pixel (no ignore)
    legend = {tuple(p) for p in pixels[top + height:].reshape(-1, 3)}
    assert {colours[0], colours[1], colours[2]} <= legend and colours[3] not in legend

    png = segmentation_overlay(image, prediction, None, names, tmp_path / 'pred.png')
    with Image.open(png) as im:
        assert im.size == (2 * width + _GAP, _TITLE_HEIGHT + height + _LEGEND_ROW)
    with pytest.raises(ValueError, match=r'prediction has shape \(32, 95\); expected the image size \(32, 96\)'):
        segmentation_overlay(image, prediction[:, :95], None, names, tmp_path / 'x.png')
    with pytest.raises(ValueError, match=r'ground truth has values \[7\]'):
        segmentation_overlay(image, prediction, torch.full_like(target, 7), names, tmp_path / 'x.png')
    assert not (tmp_path / 'x.png').exists()
