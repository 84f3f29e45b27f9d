"""conv2former.tasks.datasets: COCO / Penn-Fudan instance datasets, segmentation layouts, transforms, real data."""
import io
import json
import os
import re
import tarfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from conv2former.data import extract_archive
from conv2former.data import resolve_data_dir as resolve_dense_root
from conv2former.tasks.detection.data import (CocoDetectionDataset, PennFudanDataset, build_detection_dataset,
                                              collate_detection, detection_transforms)
from conv2former.tasks.segmentation.data import (CAMVID_CLASSES, SegmentationDataset, build_segmentation_dataset,
                                                 segmentation_transforms)

DATASETS = Path(os.environ.get('CONV2FORMER_DATASETS', Path(__file__).resolve().parents[2] / 'shared/datasets'))
MEAN, STD = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)


def write_image(path: Path, width: int, height: int, value=(90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (width, height), value).save(path)
    return path


def write_label(path: Path, array, mode='L') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode if mode != 'L' else None).save(path)
    return path


# ------------------------------------------------------------------------------------------------------ synthetic COCO
RLE_RECT = np.zeros((30, 40), np.uint8)
RLE_RECT[20:25, 25:35] = 1  # annotation 11: rows 20-24, columns 25-34


def coco_json(**changes) -> dict:
    """Image 1 (40x30): a polygon, an RLE, a crowd region, a box crossing the border, a zero-width box.
    Image 2 (20x10): nothing. Image 5 (16x16): one polygon. Category ids 7 (dog) and 3 (cat) → labels 2 and 1."""
    rle = mask_utils.encode(np.asfortranarray(RLE_RECT))
    crowd_counts = [900] + [10, 20] * 10  # column-major: columns 30-39, rows 0-9
    data = {
        'images': [{'id': 1, 'file_name': 'a.png', 'width': 40, 'height': 30},
                   {'id': 2, 'file_name': 'b.png', 'width': 20, 'height': 10},
                   {'id': 5, 'file_name': 'c.png', 'width': 16, 'height': 16}],
        'categories': [{'id': 7, 'name': 'dog'}, {'id': 3, 'name': 'cat'}],
        'annotations': [
            {'id': 10, 'image_id': 1, 'category_id': 3, 'bbox': [5, 5, 10, 10], 'area': 100, 'iscrowd': 0,
             'segmentation': [[5, 5, 15, 5, 15, 15, 5, 15]]},
            {'id': 11, 'image_id': 1, 'category_id': 7, 'bbox': [25, 20, 10, 5], 'area': 50, 'iscrowd': 0,
             'segmentation': {'size': [30, 40], 'counts': rle['counts'].decode()}},
            {'id': 12, 'image_id': 1, 'category_id': 3, 'bbox': [30, 0, 10, 10], 'area': 100, 'iscrowd': 1,
             'segmentation': {'size': [30, 40], 'counts': crowd_counts}},
            {'id': 13, 'image_id': 1, 'category_id': 7, 'bbox': [30, 25, 20, 10], 'area': 200, 'iscrowd': 0,
             'segmentation': [[30, 25, 50, 25, 50, 35, 30, 35]]},
            {'id': 14, 'image_id': 1, 'category_id': 3, 'bbox': [10, 10, 0, 5], 'area': 0, 'iscrowd': 0,
             'segmentation': [[10, 10, 10, 15, 10, 10]]},
            {'id': 20, 'image_id': 5, 'category_id': 7, 'bbox': [2, 3, 4, 5], 'area': 20, 'iscrowd': 0,
             'segmentation': [[2, 3, 6, 3, 6, 8, 2, 8]]},
        ],
    }
    data.update(changes)
    return data


def write_coco(root: Path, data: dict | None = None, split='train2017', sizes=None) -> tuple[Path, Path]:
    data = data or coco_json()
    image_dir = root / 'images' / split
    for img in data['images']:
        w, h = (sizes or {}).get(img['file_name'], (img['width'], img['height']))
        write_image(image_dir / img['file_name'], w, h)
    ann_file = root / 'annotations' / f'instances_{split}.json'
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


def test_coco_targets_masks_and_stats(tmp_path):
    ds = CocoDetectionDataset(*write_coco(tmp_path))
    assert ds.class_names == ['__background__', 'cat', 'dog'] and len(ds) == 3
    assert ds.stats == dict(boxes_clipped=1, boxes_dropped=1, crowd_excluded=1, images_without_annotations=1,
                            images_skipped=0)
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert image[:, 0, 0].tolist() == [90, 120, 150]
    assert isinstance(target['boxes'], tv_tensors.BoundingBoxes) and target['boxes'].canvas_size == (30, 40)
    assert target['boxes'].format == tv_tensors.BoundingBoxFormat.XYXY and target['boxes'].dtype == torch.float32
    assert target['boxes'].tolist() == [[5, 5, 15, 15], [25, 20, 35, 25], [30, 25, 40, 30]]  # crowd out, 13 clipped
    assert target['labels'].tolist() == [1, 2, 2] and target['labels'].dtype == torch.int64
    assert target['area'].tolist() == [100, 50, 200] and target['area'].dtype == torch.float32
    assert target['iscrowd'].tolist() == [0, 0, 0] and target['image_id'] == 1
    masks = target['masks']
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (3, 30, 40)
    square = torch.zeros(30, 40, dtype=torch.uint8)
    square[5:15, 5:15] = 1  # polygon 5..15 covers pixels 5..14
    border = torch.zeros(30, 40, dtype=torch.uint8)
    border[25:30, 30:40] = 1  # the polygon is cut at the image border
    assert torch.equal(masks[0], square) and torch.equal(masks[1], torch.from_numpy(RLE_RECT))
    assert torch.equal(masks[2], border)
    _, empty = ds[1]
    assert empty['image_id'] == 2 and empty['boxes'].shape == (0, 4) and empty['masks'].shape == (0, 10, 20)
    _, last = ds[2]
    assert last['image_id'] == 5 and last['boxes'].tolist() == [[2, 3, 6, 8]] and last['labels'].tolist() == [2]
    assert ds.image_path(2) == tmp_path / 'images/train2017/c.png'


def test_coco_skip_empty_and_box_only(tmp_path):
    ds = CocoDetectionDataset(*write_coco(tmp_path), masks=False, skip_empty=True)
    assert len(ds) == 2 and [ds[i][1]['image_id'] for i in range(2)] == [1, 5]
    assert ds.stats['images_without_annotations'] == 1 and ds.stats['images_skipped'] == 1
    assert 'masks' not in ds[0][1]
    gt = ds.coco_gt()
    assert sorted(gt.getImgIds()) == [1, 5] and all('segmentation' not in a for a in gt.dataset['annotations'])


def _evaluate(gt, detections, iou_type):
    with redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(detections), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


def test_coco_gt_contents_and_perfect_predictions_score_one(tmp_path):
    ds = CocoDetectionDataset(*write_coco(tmp_path))
    gt = ds.coco_gt()
    assert sorted(gt.getImgIds()) == [1, 2, 5] and sorted(gt.getCatIds()) == [1, 2]
    assert [c['name'] for c in gt.loadCats([1, 2])] == ['cat', 'dog']
    anns = gt.dataset['annotations']
    assert [a['id'] for a in anns] == [1, 2, 3, 4, 5]  # zero-area annotation 14 left out, ids renumbered from 1
    assert [a['bbox'] for a in anns] == [[5, 5, 10, 10], [25, 20, 10, 5], [30, 0, 10, 10], [30, 25, 10, 5],
                                         [2, 3, 4, 5]]
    assert [a['iscrowd'] for a in anns] == [0, 0, 1, 0, 0] and [a['category_id'] for a in anns] == [1, 2, 1, 2, 2]
    assert [a['area'] for a in anns] == [100, 50, 100, 200, 20] and all('segmentation' in a for a in anns)
    assert int(gt.annToMask(anns[2])[0:10, 30:40].sum()) == 100 == int(gt.annToMask(anns[2]).sum())
    boxes, segms = [], []
    for i in range(len(ds)):
        _, target = ds[i]
        for box, label, mask in zip(target['boxes'].tolist(), target['labels'].tolist(), target['masks']):
            common = dict(image_id=target['image_id'], category_id=label, score=0.9)
            boxes.append(dict(common, bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]]))
            rle = mask_utils.encode(np.asfortranarray(mask.numpy()))
            segms.append(dict(common, segmentation=rle))
    # a more confident detection on the crowd region: it must be ignored, not counted as a false positive
    boxes.append(dict(image_id=1, category_id=1, score=1.0, bbox=[30, 0, 10, 10]))
    assert _evaluate(gt, boxes, 'bbox') == pytest.approx(1.0)
    assert _evaluate(gt, segms, 'segm') == pytest.approx(1.0)
    boxes[-1]['bbox'] = [0, 20, 10, 10]  # the same detection elsewhere is a false positive ranked first
    assert _evaluate(gt, boxes, 'bbox') < 0.9


def test_coco_bad_annotations(tmp_path):
    data = coco_json()
    data['annotations'][1]['category_id'] = 99
    image_dir, ann_file = write_coco(tmp_path / 'cat', data)
    with pytest.raises(ValueError, match=r'instances_train2017\.json.*annotation id 11.*category_id 99.*\[3, 7\]'):
        CocoDetectionDataset(image_dir, ann_file)
    data = coco_json()
    data['annotations'][1]['segmentation']['size'] = [31, 40]
    image_dir, ann_file = write_coco(tmp_path / 'rle', data)
    with pytest.raises(ValueError, match=r'annotation id 11.*RLE mask size \[31, 40\].*\[30, 40\]'):
        CocoDetectionDataset(image_dir, ann_file)
    ds = CocoDetectionDataset(*write_coco(tmp_path / 'size', sizes={'c.png': (17, 16)}))
    with pytest.raises(ValueError, match=r'c\.png: decoded image is 17x16.*16x16'):
        ds[2]
    data = coco_json()
    del data['annotations'][0]['segmentation']
    image_dir, ann_file = write_coco(tmp_path / 'noseg', data)
    with pytest.raises(ValueError, match='annotation id 10 .*no segmentation.*masks=False'):
        CocoDetectionDataset(image_dir, ann_file)
    assert len(CocoDetectionDataset(image_dir, ann_file, masks=False)) == 3
    (image_dir / 'b.png').unlink()
    with pytest.raises(FileNotFoundError, match=r'1 image files .*b\.png'):
        CocoDetectionDataset(image_dir, ann_file, masks=False)


def test_build_detection_dataset_coco_layout(tmp_path):
    write_coco(tmp_path)
    for split in ('train', 'train2017'):
        ds = build_detection_dataset(tmp_path, split, masks=False)
        assert isinstance(ds, CocoDetectionDataset) and len(ds) == 3
    with pytest.raises(FileNotFoundError, match=r'instances_val\*\.json.*instances_train2017\.json.*train2017'):
        build_detection_dataset(tmp_path, 'val')
    (tmp_path / 'other').mkdir()
    with pytest.raises(FileNotFoundError, match='Penn-Fudan.*COCO'):
        build_detection_dataset(tmp_path / 'other', 'train')
    with pytest.raises(FileNotFoundError, match='missing.*does not exist.*Penn-Fudan'):
        build_detection_dataset(tmp_path / 'missing', 'train')


# ------------------------------------------------------------------------------------------------- synthetic Penn-Fudan
def write_pennfudan(root: Path, n=5, size=(20, 16)) -> Path:
    """``n`` images (W x H = size), each with person 1 at rows 2-5 / columns 3-7 and person 2 at rows 8-12 /
    columns 10-15 (shifted right by the image index)."""
    for i in range(n):
        write_image(root / 'JPEGImages' / f'img{i:02d}.jpg', *size)
        ids = np.zeros(size[::-1], np.uint8)
        ids[2:6, 3:8] = 1
        ids[8:13, 10 + i % 3:16 + i % 3] = 2
        write_label(root / 'PedMasks' / f'img{i:02d}_mask.png', ids)
    return root


def test_pennfudan_boxes_masks_and_splits(tmp_path):
    root = write_pennfudan(tmp_path / 'PennFudanPed')
    ds = PennFudanDataset(root, 'all')
    assert len(ds) == 5 and ds.class_names == ['__background__', 'person'] and not any(ds.stats.values())
    image, target = ds[1]
    assert image.shape == (3, 16, 20) and target['image_id'] == 2
    assert target['boxes'].tolist() == [[3, 2, 7, 5], [11, 8, 16, 12]]  # masks_to_boxes convention: no +1
    assert torch.equal(target['boxes'], masks_to_boxes(target['masks']))
    assert target['labels'].tolist() == [1, 1] and target['area'].tolist() == [20, 30]
    assert target['masks'].sum((1, 2)).tolist() == [20, 30] and target['masks'][0, 2:6, 3:8].all()
    train, val = PennFudanDataset(root, 'train', holdout=2), PennFudanDataset(root, 'val', holdout=2)
    train_ids = [train[i][1]['image_id'] for i in range(len(train))]
    val_ids = [val[i][1]['image_id'] for i in range(len(val))]
    assert len(train_ids) == 3 and len(val_ids) == 2 and sorted(train_ids + val_ids) == [1, 2, 3, 4, 5]
    expected_val = sorted(i + 1 for i in torch.randperm(5, generator=torch.Generator().manual_seed(1))[3:].tolist())
    assert val_ids == expected_val
    assert [r.image_id for r in PennFudanDataset(root, 'val', holdout=2)._records] == val_ids  # deterministic
    gt = val.coco_gt()
    assert sorted(gt.getImgIds()) == val_ids and len(gt.dataset['annotations']) == 4
    assert int(gt.annToMask(gt.dataset['annotations'][0]).sum()) == 20
    with pytest.raises(ValueError, match='holdout=5'):
        PennFudanDataset(root, 'train', holdout=5)


def test_pennfudan_errors(tmp_path):
    root = write_pennfudan(tmp_path / 'a', n=2)
    write_label(root / 'PedMasks' / 'img01_mask.png', np.zeros((16, 21)))
    with pytest.raises(ValueError, match=r'img01_mask\.png is 21x16.*img01\.jpg is 20x16'):
        PennFudanDataset(root, 'all')
    root = write_pennfudan(tmp_path / 'b', n=2)
    (root / 'PedMasks' / 'img00_mask.png').unlink()
    with pytest.raises(ValueError, match=r'img00\.jpg has no mask file.*img00_mask\.png'):
        PennFudanDataset(root, 'all')


def test_detection_from_archive_with_one_top_folder(tmp_path):
    write_pennfudan(tmp_path / 'src' / 'PennFudanPed', n=4)
    archive = tmp_path / 'pf.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(tmp_path / 'src' / 'PennFudanPed', arcname='PennFudanPed')
    cache = tmp_path / 'cache'
    assert resolve_dense_root(archive, cache) == extract_archive(archive, cache) / 'PennFudanPed'
    train = build_detection_dataset(archive, 'train', holdout=1, cache_dir=cache)
    assert isinstance(train, PennFudanDataset) and len(train) == 3
    assert train.image_path(0).is_relative_to(cache)
    with pytest.raises(FileNotFoundError, match='nothing.tar.gz'):
        extract_archive(tmp_path / 'nothing.tar.gz')
    (tmp_path / 'notes.txt').write_text('x')
    with pytest.raises(ValueError, match=r'notes\.txt is neither a directory nor a .tar'):
        resolve_dense_root(tmp_path / 'notes.txt')


# ---------------------------------------------------------------------------------------------- detection transforms
def test_detection_flip_moves_boxes_and_masks_together(tmp_path):
    ds = CocoDetectionDataset(*write_coco(tmp_path), transforms=detection_transforms(True, hflip=1.0))
    plain = CocoDetectionDataset(*write_coco(tmp_path))
    image, target = ds[0]
    image0, target0 = plain[0]
    assert image.dtype == torch.float32 and torch.allclose(image, image0.flip(-1) / 255)
    assert target['boxes'].tolist() == [[25, 5, 35, 15], [5, 20, 15, 25], [0, 25, 10, 30]]  # x -> 40 - x
    assert torch.equal(target['masks'], target0['masks'].flip(-1))
    assert target['labels'].tolist() == [1, 2, 2] and target['image_id'] == 1
    image, target = CocoDetectionDataset(*write_coco(tmp_path), transforms=detection_transforms(False))[0]
    assert torch.allclose(image, image0 / 255) and target['boxes'].tolist() == target0['boxes'].tolist()


def test_detection_sanitize_keeps_instance_fields_aligned():
    image = tv_tensors.Image(torch.zeros(3, 10, 10, dtype=torch.uint8))
    masks = torch.zeros(2, 10, 10, dtype=torch.uint8)
    masks[1, 2:5, 2:5] = 1
    target = dict(boxes=tv_tensors.BoundingBoxes([[1, 1, 1.5, 6], [2, 2, 5, 5]], format='XYXY', canvas_size=(10, 10)),
                  labels=torch.tensor([3, 4]), area=torch.tensor([2.5, 9.0]), iscrowd=torch.tensor([0, 0]),
                  masks=tv_tensors.Mask(masks), image_id=7)
    _, out = detection_transforms(False)(image, target)
    assert out['boxes'].tolist() == [[2, 2, 5, 5]] and out['labels'].tolist() == [4]
    assert out['area'].tolist() == [9.0] and out['iscrowd'].tolist() == [0]
    assert out['masks'].shape == (1, 10, 10) and out['masks'].sum() == 9 and out['image_id'] == 7


def test_collate_detection(tmp_path):
    ds = CocoDetectionDataset(*write_coco(tmp_path), transforms=detection_transforms(False))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 30, 40), (3, 10, 20), (3, 16, 16)]
    assert [t['image_id'] for t in targets] == [1, 2, 5] and [len(t['boxes']) for t in targets] == [3, 0, 1]


# ------------------------------------------------------------------------------------------- semantic segmentation
LABEL = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], np.uint8)  # 4x3 (W x H), all CamVid values


def write_pairs(image_dir: Path, label_dir: Path, names=('x1', 'x2'), label=LABEL, ext='.png') -> None:
    for name in names:
        write_image(image_dir / f'{name}.jpg', label.shape[1], label.shape[0])
        write_label(label_dir / f'{name}{ext}', label)


def test_camvid_layout_label_map_and_value_errors(tmp_path):
    for split in ('train', 'val'):
        write_pairs(tmp_path / split, tmp_path / f'{split}annot')
    ds = build_segmentation_dataset(tmp_path, 'validation')
    assert ds.class_names == CAMVID_CLASSES and len(CAMVID_CLASSES) == 11 and len(ds) == 2
    image, mask = ds[1]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 3, 4) and image.dtype == torch.uint8
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
    assert mask.flatten().tolist() == list(range(11)) + [255]  # void 11 -> ignore_index
    assert ds.image_path(1) == tmp_path / 'val' / 'x2.jpg'
    bad = LABEL.copy()
    bad[0, 0] = 12
    write_label(tmp_path / 'trainannot' / 'x2.png', bad)
    train = build_segmentation_dataset(tmp_path, 'train')
    assert train[0][1].max() == 255
    with pytest.raises(ValueError, match=r'x2\.png: label values 12 after label_map .*0\.\.10'):
        train[1]


def test_ade20k_layout_reduce_zero_label_and_names(tmp_path):
    label = np.array([[0, 1], [3, 255]], np.uint8)
    write_pairs(tmp_path / 'images' / 'training', tmp_path / 'annotations' / 'training', names=('ADE_1',), label=label)
    (tmp_path / 'classes.txt').write_text('wall\nbuilding\nsky\n')
    ds = build_segmentation_dataset(tmp_path, 'train')
    assert ds.class_names == ['wall', 'building', 'sky'] and ds.reduce_zero_label
    assert ds[0][1].tolist() == [[255, 0], [2, 255]]  # 0 -> ignore, v -> v - 1, 255 stays ignored
    with pytest.raises(ValueError, match=r'ADE_1\.png: label values 3 are outside the valid range 0\.\.2'):
        build_segmentation_dataset(tmp_path, 'train', reduce_zero_label=False)[0]
    (tmp_path / 'classes.txt').unlink()
    (tmp_path / 'objectInfo150.txt').write_text('Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n'
                                                 '2\t0.1\t1\t1\tbuilding;edifice\n3\t0.1\t1\t1\tsky\n')
    assert build_segmentation_dataset(tmp_path, 'training').class_names == ['wall', 'building', 'sky']
    with pytest.raises(ValueError, match='num_classes=4 but 3 class names'):
        build_segmentation_dataset(tmp_path, 'train', num_classes=4)


def test_generic_layouts_and_label_errors(tmp_path):
    write_pairs(tmp_path / 'a' / 'train' / 'images', tmp_path / 'a' / 'train' / 'masks', label=LABEL % 3)
    ds = build_segmentation_dataset(tmp_path / 'a', 'training', num_classes=3)
    assert ds.class_names == ['class_0', 'class_1', 'class_2'] and not ds.reduce_zero_label
    assert ds[0][1].flatten().tolist() == (LABEL % 3).flatten().tolist()
    write_pairs(tmp_path / 'b' / 'images' / 'valid', tmp_path / 'b' / 'labels' / 'valid', label=LABEL % 2)
    (tmp_path / 'b' / 'classes.txt').write_text('road\ncar\n')
    assert build_segmentation_dataset(tmp_path / 'b', 'val').class_names == ['road', 'car']
    with pytest.raises(ValueError, match='class names of .* are unknown'):
        build_segmentation_dataset(tmp_path / 'a', 'train')
    mapped = SegmentationDataset(ds.pairs, ['a', 'b'], reduce_zero_label=True, label_map={2: 0})
    assert mapped[0][1].flatten().tolist() == [255 if v == 0 else (0 if v == 2 else v - 1) for v in (LABEL % 3).flat]

    write_image(tmp_path / 'a' / 'train' / 'images' / 'x3.jpg', 4, 3)
    with pytest.raises(ValueError, match=r'1 of 3 images .* have no label .*: x3'):
        build_segmentation_dataset(tmp_path / 'a', 'train', num_classes=3)
    Image.new('RGB', (4, 3)).save(tmp_path / 'a' / 'train' / 'masks' / 'x3.png')
    rgb = build_segmentation_dataset(tmp_path / 'a', 'train', num_classes=3)
    with pytest.raises(ValueError, match=r'x3\.png: label image has mode RGB; expected a single-channel index PNG'):
        rgb[2]
    write_label(tmp_path / 'a' / 'train' / 'masks' / 'x3.png', np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r'label .*x3\.png is 4x4 \(WxH\) but image .*x3\.jpg is 4x3'):
        build_segmentation_dataset(tmp_path / 'a', 'train', num_classes=3)[2]
    with pytest.raises(FileNotFoundError, match=r"no 'test' split .*testing.*CamVid.*ADE20k.*generic"):
        build_segmentation_dataset(tmp_path / 'a', 'test', num_classes=3)
    (tmp_path / 'c' / 'train' / 'images').mkdir(parents=True)
    (tmp_path / 'c' / 'train' / 'masks').mkdir()
    with pytest.raises(FileNotFoundError, match=r'no images in .*c/train/images'):
        build_segmentation_dataset(tmp_path / 'c', 'train', num_classes=3)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_segmentation_dataset(tmp_path / 'a', 'dev')


# -------------------------------------------------------------------------------------------- segmentation transforms
def _sample(height=20, width=30):
    image = tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 5, (height, width), dtype=torch.int64))
    return image, mask


def _normalized(image):
    return (image.float() / 255 - MEAN[:, None, None]) / STD[:, None, None]


def test_segmentation_train_crop_pads_mask_with_ignore_index():
    image, mask = _sample()
    transform = segmentation_transforms(True, crop_size=(32, 48), scale_range=(1, 1), hflip=0, photometric=False)
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 32, 48) and out_mask.shape == (32, 48) and out_mask.dtype == torch.int64
    padded = out_mask == 255
    assert int(padded.sum()) == 32 * 48 - 20 * 30
    pad_value = (-MEAN / STD)[:, None].expand(3, int(padded.sum()))
    assert torch.allclose(out_image[:, padded], pad_value, atol=1e-6)
    assert sorted(torch.unique(out_mask[~padded]).tolist()) == sorted(torch.unique(mask).tolist())
    assert torch.allclose(torch.sort(out_image[:, ~padded].flatten()).values,
                          torch.sort(_normalized(image).flatten()).values, atol=1e-5)  # same pixels, moved


def test_segmentation_train_rescale_and_flip():
    image, mask = _sample()
    out_image, out_mask = segmentation_transforms(True, crop_size=(40, 60), scale_range=(2, 2), hflip=0,
                                                  photometric=False)(image, mask)
    assert out_image.shape == (3, 40, 60) and not (out_mask == 255).any()
    assert torch.equal(out_mask, mask.repeat_interleave(2, 0).repeat_interleave(2, 1))  # nearest, no new values
    out_image, out_mask = segmentation_transforms(True, crop_size=(10, 15), scale_range=(1, 1), base_size=10,
                                                  hflip=1.0, photometric=False)(image, mask)
    assert out_image.shape == (3, 10, 15) and not (out_mask == 255).any()
    out_image, out_mask = segmentation_transforms(True, crop_size=(20, 30), scale_range=(1, 1), hflip=1.0,
                                                  photometric=False)(image, mask)
    assert torch.equal(out_mask, mask.flip(-1)) and torch.allclose(out_image, _normalized(image).flip(-1), atol=1e-6)
    with pytest.raises(ValueError, match='scale_range'):
        segmentation_transforms(True, scale_range=(2, 1))


def test_segmentation_eval_keeps_size_and_normalizes():
    image, mask = _sample(37, 23)
    out_image, out_mask = segmentation_transforms(False)(image, mask)
    assert out_image.shape == (3, 37, 23) and out_image.dtype == torch.float32
    assert torch.allclose(out_image, _normalized(image), atol=1e-6) and torch.equal(out_mask, mask)


# ------------------------------------------------------------------------------------------------------ real datasets
@pytest.fixture(scope='module')
def real_data(tmp_path_factory):
    if not DATASETS.is_dir():
        pytest.skip(f'real datasets not found at {DATASETS} (set CONV2FORMER_DATASETS)')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CONV2FORMER_CACHE', str(tmp_path_factory.mktemp('dense-cache')))
        yield DATASETS


def _archive(real_data: Path, name: str) -> Path:
    path = real_data / name
    if not path.is_file():
        pytest.skip(f'{path} not found')
    return path


def test_real_pennfudan(real_data):
    archive = _archive(real_data, 'pennfudan.tar.gz')
    train = build_detection_dataset(archive, 'train')
    val = build_detection_dataset(archive, 'val', masks=False)
    everything = build_detection_dataset(archive, 'all', masks=False)
    assert len(train) == 120 and len(val) == 50 and len(everything) == 170
    train_ids, val_ids = {r.image_id for r in train._records}, {r.image_id for r in val._records}
    assert not train_ids & val_ids and train_ids | val_ids == set(range(1, 171))
    assert str(train.image_path(0)).startswith(os.environ['CONV2FORMER_CACHE'])
    index = next(i for i in range(len(everything)) if everything.image_path(i).stem == 'FudanPed00001')
    text = (everything.image_path(index).parents[1] / 'Annotation' / 'FudanPed00001.txt').read_text()
    expected = [[int(v) - 1 for v in m] for m in re.findall(r'\((\d+), (\d+)\) - \((\d+), (\d+)\)', text)]  # 1-based
    image, target = everything[index]
    assert image.shape[1:] == (536, 559) and len(expected) == 2
    assert torch.allclose(target['boxes'], torch.tensor(expected, dtype=torch.float32), atol=2)


def test_real_camvid_val(real_data):
    ds = build_segmentation_dataset(_archive(real_data, 'camvid.tar.gz'), 'val')
    assert len(ds) == 101 and ds.class_names == CAMVID_CLASSES
    seen = set()
    for i in range(0, len(ds), 10):
        image, mask = ds[i]
        assert image.shape == (3, 360, 480) and mask.shape == (360, 480)
        seen |= set(torch.unique(mask).tolist())
    assert seen <= set(range(11)) | {255} and 255 in seen and len(seen) >= 10


def test_real_coco128(real_data):
    root = resolve_dense_root(_archive(real_data, 'coco128.tar.gz'))
    data = json.loads((root / 'annotations' / 'instances_train2017.json').read_text())
    sizes = {im['id']: (im['width'], im['height']) for im in data['images']}
    crowd = sum(a['iscrowd'] for a in data['annotations'])
    expected_dropped = sum(1 for a in data['annotations'] if not a['iscrowd'] and (
        min(a['bbox'][0] + a['bbox'][2], sizes[a['image_id']][0]) <= max(a['bbox'][0], 0)
        or min(a['bbox'][1] + a['bbox'][3], sizes[a['image_id']][1]) <= max(a['bbox'][1], 0)))
    ds = build_detection_dataset(root, 'train2017', masks=False)
    assert len(ds) == 128 and len(ds.class_names) == 81 and crowd == 10 == ds.stats['crowd_excluded']
    assert ds.stats['boxes_dropped'] == expected_dropped and ds.stats['images_without_annotations'] == 2
    n_boxes = sum(len([x for x in r.instances if not x.iscrowd]) for r in ds._records)
    assert n_boxes == 929 - expected_dropped == len(data['annotations']) - crowd - expected_dropped
    assert len(ds.coco_gt().dataset['annotations']) == 939 - expected_dropped
    masked = build_detection_dataset(root, 'train', masks=True)
    image, target = masked[0]
    assert image.shape[1:] == target['masks'].shape[1:] and len(target['masks']) == len(target['boxes']) > 0
    assert (target['masks'].flatten(1).sum(1) > 0).all()
