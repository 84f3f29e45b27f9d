"""Detection recipes: named sets of option values (explicit flags and --config values override them).

Detection follows the ConvNeXt / Swin Mask R-CNN COCO recipe (mmdetection): AdamW, weight decay 0.05, layer-wise lr
decay 0.95, multi-scale training (short side 480-800 in steps of 32, long side <= 1333; test at 800), 500 linear
warm-up iterations from 0.1% of the lr, lr x0.1 at epochs 8 and 11 (1x, 12 epochs) or 27 and 33 (3x, 36 epochs),
batch 16 (2 images x 8 GPUs: -b 2 under an 8-process torchrun). ConvNeXt groups its layers coarser (6 groups)
than we do (one per block), so the same rate decays a little faster here.
"""

_MULTI_SCALE = tuple(range(480, 801, 32))
_DETECTION = dict(opt='adamw', weight_decay=0.05, layer_decay=0.95, sched='multistep', decay_rate=0.1,
                  warmup_iters=500, warmup_ratio=0.001, min_lr=0.0, batch_size=2, min_size=_MULTI_SCALE,
                  max_size=1333, hflip=0.5)

DETECTION_RECIPES = {
    'maskrcnn-1x': dict(_DETECTION, model='maskrcnn', epochs=12, decay_milestones=(8, 11), lr=1e-4, drop_path=0.2),
    'maskrcnn-3x': dict(_DETECTION, model='maskrcnn', epochs=36, decay_milestones=(27, 33), lr=2e-4, drop_path=0.4),
    'fasterrcnn-1x': dict(_DETECTION, model='fasterrcnn', epochs=12, decay_milestones=(8, 11), lr=1e-4,
                          drop_path=0.2),
    'fasterrcnn-3x': dict(_DETECTION, model='fasterrcnn', epochs=36, decay_milestones=(27, 33), lr=2e-4,
                          drop_path=0.4),
}
