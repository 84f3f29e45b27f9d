"""Segmentation recipes: named sets of option values (explicit flags and --config values override them).

Segmentation follows the ConvNeXt / Swin UperNet ADE20k recipe (mmsegmentation): 160k iterations of batch 16, AdamW
lr 1e-4, weight decay 0.05, layer decay 0.9, poly schedule (power 1, to 0), 1500 warm-up iterations, crop 512,
random rescale 0.5-2x of a 512 short side, flip, photometric distortion. Its auxiliary FCN head is not built.
"""

SEGMENTATION_RECIPES = {
    'upernet-160k': dict(model='upernet', opt='adamw', lr=1e-4, weight_decay=0.05, layer_decay=0.9, sched='poly',
                         decay_rate=1.0, min_lr=0.0, warmup_iters=1500, warmup_ratio=1e-6, iters=160000, batch_size=2,
                         crop_size=(512, 512), scale_range=(0.5, 2.0), base_size=512, hflip=0.5, photometric=True,
                         drop_path=0.3, decoder_channels=512),
}
