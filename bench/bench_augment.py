"""Training-batch augmentation of `cls_learner`: MONAI's transforms one volume at a time (`cls_augment`, what
`Augment3D` ran before issue 14's review) against `BatchAugment3D` (the whole batch in one warp), in the same run.

    python bench/bench_augment.py                       # the CPU (and the GPU, when there is one)
    python bench/bench_augment.py --threads 1 --json out.json

Prints, per device and batch shape, the median seconds per batch of each and the ratio (per volume / batched). Both
draw flips along every axis, an affine (rotation, scale, shift) and intensity jitter with the same probabilities.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from dagman_fast.classify import BatchAugment3D, cls_augment

SHAPES = {'28^3 x 32 (AdrenalMNIST3D)': (32, 1, 28, 28, 28), '64^3 x 8': (8, 1, 64, 64, 64)}


def per_volume(tfm):
    def run(x):
        tfm.set_random_state(int(torch.randint(2 ** 31 - 1, ())))
        return torch.stack([tfm(v).as_tensor() for v in x])
    return run


def seconds(fn, x, reps: int) -> float:
    "Median wall seconds of `fn(x)` over `reps` calls after one warm-up, synchronising a GPU."
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fn(x), sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reps', type=int, default=10)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch chooses)')
    p.add_argument('--json', default=None, help='also write the rows to this file')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name, shape in SHAPES.items():
            x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
            old = seconds(per_volume(cls_augment()), x, args.reps)
            new = seconds(BatchAugment3D(), x, args.reps)
            rows.append(dict(device=torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu',
                             batch=name, per_volume_s=round(old, 5), batched_s=round(new, 5),
                             ratio=round(old / new, 2), threads=torch.get_num_threads()))
            print(json.dumps(rows[-1]), flush=True)
    print('\n| device | batch | MONAI per volume (s) | BatchAugment3D (s) | ratio |\n|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['device']} | {r['batch']} | {r['per_volume_s']} | {r['batched_s']} | {r['ratio']:.1f}x |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
