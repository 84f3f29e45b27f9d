"""Training recipes: named sets of flag defaults. Explicit flags and --config values override them.

``in1k`` is the paper's ImageNet-1k recipe (upstream / ConvNeXt / DeiT settings), ``in22k`` its 90-epoch
ImageNet-22k pre-training, ``finetune`` ConvNeXt's 30-epoch fine-tuning. ``small`` is ours, not the paper's: a
short, lightly regularised schedule for CIFAR-10 / Imagenette / the bundled Fashion-MNIST subset.
"""

# Per-model stochastic depth ('per-model'). Upstream publishes no per-model values (its train.sh takes one as an
# argument); the paper says the rate grows with size up to 0.7. We use ConvNeXt's values at equal size (T 0.1,
# S 0.4, B 0.5) and 0.7 for L; N and IS follow T, IB follows B.
DROP_PATH = {
    'conv2former_n': 0.1, 'conv2former_t': 0.1, 'conv2former_s': 0.4, 'conv2former_b': 0.5,
    'conv2former_b_22k': 0.5, 'conv2former_l': 0.7, 'conv2former_is': 0.1, 'conv2former_ib': 0.5,
}

_PAPER_AUGMENT = dict(
    aa='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, color_jitter=0.4,
    interpolation='bicubic', scale=(0.08, 1.0),
)

RECIPES = {
    'in1k': dict(
        _PAPER_AUGMENT, opt='adamw', blr=1e-3, weight_decay=0.05, epochs=300, warmup_epochs=5, warmup_lr=1e-6,
        sched='cosine', min_lr=1e-6, cooldown_epochs=10, batch_size=128, img_size=224, model_ema=False,
        drop_path='per-model',
    ),
    'in22k': dict(
        _PAPER_AUGMENT, opt='adamw', blr=1e-3, weight_decay=0.05, epochs=90, warmup_epochs=5, warmup_lr=1e-6,
        sched='cosine', min_lr=1e-6, batch_size=128, img_size=224, drop_path='per-model',
    ),
    'finetune': dict(
        _PAPER_AUGMENT, opt='adamw', blr=5e-5, weight_decay=1e-8, epochs=30, warmup_epochs=0, sched='cosine',
        min_lr=1e-6, layer_decay=0.8, batch_size=32, img_size=384, model_ema=True, model_ema_decay=0.9999,
        drop_path='per-model',
    ),
    'small': dict(
        opt='adamw', blr=1e-2, weight_decay=0.05, epochs=10, warmup_epochs=1, warmup_lr=1e-5, sched='cosine',
        min_lr=1e-5, batch_size=64, smoothing=0.1, reprob=0.0, mixup=0.0, cutmix=0.0, aa=None, color_jitter=0.0,
        scale=(0.6, 1.0), hflip=0.5, drop_path=0.05, interpolation='bilinear',
    ),
}
