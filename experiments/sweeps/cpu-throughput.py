"""Training and evaluation throughput of candidate models for the CPU ablations (issue 23), to size the grid.

Times what one epoch of ``conv2former train --data-cache`` spends in the model: forward + backward + AdamW step on
float32 batches (model.train(), label-smoothed cross-entropy, the model's default lean backward), and no-grad
evaluation batches, at the default torch thread count. The tensor-resident data path's gather + crop + flip is not
included (it runs at ~6,000 img/s at 128 px on this machine, experiments/results/data-path.md: ~1.5 s per epoch).
Prints one line per configuration and the predicted seconds per epoch for Imagenette (9,469 train / 3,925 val):

    .venv/bin/python experiments/sweeps/cpu-throughput.py --img-size 96 --model-kwargs depths=[1,1,3,1] \\
        dims=[32,64,128,256] kernel_size=21
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import conv2former  # noqa: F401  (registers the models)
from conv2former.engine.options import keywords

TRAIN, VAL = 9469, 3925


def timed(step, warmup: int, iters: int) -> list:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='conv2former_n')
    p.add_argument('--model-kwargs', nargs='*', default=[])
    p.add_argument('--img-size', type=int, default=96)
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--eval-batch', type=int, default=256)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=10, help='timed training steps (fastest and median reported)')
    p.add_argument('--eval-iters', type=int, default=3)
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--drop-path', type=float, default=0.05)
    args = p.parse_args()
    torch.manual_seed(0)
    kwargs = keywords(args.model_kwargs) if args.model_kwargs else {}
    model = timm.create_model(args.model, num_classes=10, drop_path_rate=args.drop_path, **kwargs)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).to(memory_format=memory)
    y = torch.randint(0, 10, (args.batch_size,))

    def train_step():
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    train = timed(train_step, args.warmup, args.iters)
    xe = torch.randn(args.eval_batch, 3, args.img_size, args.img_size).to(memory_format=memory)
    model.eval()
    with torch.no_grad():
        evals = timed(lambda: model(xe), 1, args.eval_iters)
    # the machine is shared: other jobs come in bursts, so the fastest steps are the uncontended speed and the
    # median the typical one
    out = dict(model=args.model, kwargs=kwargs, img_size=args.img_size, batch=args.batch_size,
               channels_last=args.channels_last, threads=torch.get_num_threads(), params=params)
    for label, pick in (('best', min), ('median', statistics.median)):
        train_rate, eval_rate = args.batch_size / pick(train), args.eval_batch / pick(evals)
        out.update({f'train_img_s_{label}': round(train_rate, 1), f'eval_img_s_{label}': round(eval_rate, 1),
                    f'epoch_s_{label}': round(TRAIN / train_rate + VAL / eval_rate, 1)})
    out['steps_s'] = [round(t, 2) for t in train]
    out['load'] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == '__main__':
    main()
