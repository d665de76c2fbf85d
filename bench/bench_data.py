"""CT pipeline throughput: `ct_ssl_dls` (cached preprocessing, random views per epoch) against a naive MONAI
`Compose` that does the same transforms from the file for every sample, on the real scans in ../shared/data.

    python bench/bench_data.py                 # 3 real CTs, crop 128 at 2 mm, 3 epochs each
    python bench/bench_data.py --crop 96 --epochs 5 --num-workers 2
    python bench/bench_data.py --augment       # where the views' flips and jitter run: host or device (`augment_on`)

Both pipelines produce the same thing: two random crops of each preprocessed volume per sample. The first epoch of
`ct_ssl_dls` (which reads every scan and fills the cache) is reported apart from the steady state.

`--augment`: the host's time per batch (batch 2 x 2 views at `--crop`, cached volumes, `num_workers=0`, the main
process's share of a step on a GPU) with the flips and jitter on the host (MONAI per view) and with only the crops
there (`augment_on='device'`), alternated; then `TwoViews.batch_augment` on the batch's device (CUDA when present,
else the CPU, where it only shows the work moved).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'
SCANS = ['lidc_idri/LIDC-IDRI-0001.nii.gz', 'lidc_idri/LIDC-IDRI-0002_ds2.nii.gz', 'totalsegmentator/example_ct.nii.gz']


class _TreeRSS:
    "Polls the memory (PSS) of this process and its children (DataLoader workers) in a thread; keeps the peak sum."

    def __init__(self, interval: float = 0.02):
        import threading
        self.peak, self._stop, self.interval = 0, threading.Event(), interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss_kib(pid) -> int:
        "Proportional set size: pages shared with the parent after fork count once in the sum, not once per worker."
        try:
            for line in Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines():
                if line.startswith('Pss:'):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _children(self):
        try:
            return Path(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read_text().split()
        except OSError:
            return []

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss_kib(os.getpid()) + sum(self._rss_kib(c) for c in self._children()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--crop', type=int, default=128)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--num-workers', type=int, default=0)
    p.add_argument('--data', type=Path, default=SHARED)
    p.add_argument('--synthetic', type=int, default=0,
                   help='instead of the real scans, this many synthetic CT volumes (MONAI generator) written as NIfTI '
                        'to a temporary folder: shows how memory scales with the number of scans')
    p.add_argument('--augment', action='store_true', help="time the host's share with augment_on 'host' and 'device'")
    p.add_argument('--reps', type=int, default=20, help='with --augment: batches per setting')
    args = p.parse_args()
    if args.augment:
        return _augment(args)
    if args.synthetic:
        return _synthetic(args)
    scans = [args.data / s for s in SCANS if (args.data / s).exists()]
    if not scans:
        raise SystemExit(f'no scans found under {args.data} (expected {SCANS})')
    torch.manual_seed(0)
    import warnings
    warnings.filterwarnings('ignore', category=FutureWarning)
    from monai import transforms as T

    from dagman_fast.data import CTPreprocess, TwoViews, ct_ssl_dls

    crop = (args.crop,) * 3
    prep = CTPreprocess(crop=crop)
    views = TwoViews([], crop)  # its random transform, applied to a volume twice per sample
    naive = T.Compose([prep.transform()])
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.epochs):
        for s in scans:
            vol = naive({'image': str(s)})['image']
            _ = (views._view(vol), views._view(vol))
            n += 1
    naive_rate = n / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        dls = ct_ssl_dls(scans, crop=args.crop, bs=1, cache_dir=cache, num_workers=args.num_workers, progress=False)
        for _ in dls.train:
            pass
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        base = _TreeRSS._rss_kib(os.getpid())
        with _TreeRSS() as tree:
            for _ in range(args.epochs):
                for v1, v2 in dls.train:
                    n += v1.shape[0]
        cached_rate = n / (time.perf_counter() - t0)
        vol_mib = sum(v.numel() * v.element_size() for v in dls.volumes) / 2 ** 20
    print(f'{len(scans)} real CT scans ({", ".join(s.name for s in scans)}), crop {args.crop}^3 at 2 mm, two views, '
          f'{os.cpu_count()} CPUs, num_workers={args.num_workers}, torch {torch.__version__}')
    print(f'naive MONAI Compose from the file every sample: {naive_rate:8.2f} samples/s')
    print(f'ct_ssl_dls, first epoch (reads scans, fills the cache): {first:6.1f} s for {len(scans)} samples')
    print(f'ct_ssl_dls, steady state (cached):                {cached_rate:8.2f} samples/s')
    print(f'speed-up in the steady state: {cached_rate / naive_rate:.1f}x')
    print(f'steady state memory (PSS), this process and its {args.num_workers} worker(s) together: peak {tree.peak / 1024:.0f} MiB '
          f'({(tree.peak - base) / 1024:.0f} MiB above the process before the epochs; all preprocessed volumes '
          f'together: {vol_mib:.0f} MiB)')


def _augment(args):
    "The host's time per batch with the views' flips and jitter on the host or left to the device."
    import platform
    import statistics

    from dagman_fast.data import ct_ssl_dls, demo_ct_scans
    scans = [args.data / s for s in SCANS if (args.data / s).exists()] or demo_ct_scans()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    with tempfile.TemporaryDirectory() as cache:
        kw = dict(crop=args.crop, bs=2, cache_dir=cache, progress=False)
        dls = {on: ct_ssl_dls(scans, augment_on=on, **kw) for on in ('host', 'device')}
        times = {'host': [], 'device': []}
        for _ in range(args.reps):
            for on in times:
                ds = dls[on].train.dataset
                t0 = time.perf_counter()
                # the host's work for one batch: 2 samples' views, collated (no copy to a device, no after_batch)
                batch = [torch.stack(v) for v in zip(*(ds[i % len(ds)] for i in range(2)))]
                times[on].append(time.perf_counter() - t0)
        aug = dls['device'].train.dataset.batch_augment
        views = tuple(v.to(device) for v in batch)
        dev_times = []
        for _ in range(args.reps + 1):
            if device == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            aug(views)
            if device == 'cuda':
                torch.cuda.synchronize()
            dev_times.append(time.perf_counter() - t0)
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
               platform.processor())
    h, d = statistics.median(times['host']), statistics.median(times['device'])
    print(f'{len(scans)} scans, batch 2 x 2 views of {args.crop}^3, median of {args.reps}; {cpu}, torch {torch.__version__}')
    print(f'host per batch, flips and jitter on the host:   {h * 1e3:7.1f} ms')
    print(f'host per batch, crops only (augment_on=device):  {d * 1e3:7.1f} ms   ({h / d:.1f}x less host time)')
    print(f'batch_augment of the batch on {device}:            {statistics.median(dev_times[1:]) * 1e3:7.1f} ms')


def _synthetic(args):
    "Memory of the steady state with `args.synthetic` scans: it must not grow with the number of scans."
    import nibabel as nib
    import numpy as np
    from monai.data import create_test_image_3d

    from dagman_fast.data import ct_ssl_dls
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.RandomState(0)
        for i in range(args.synthetic):
            img, _ = create_test_image_3d(160, 160, 160, num_objs=12, rad_max=30, noise_max=0.2, random_state=rng)
            hu = (img * 400 - 1000).astype(np.float32)  # objects as soft tissue in air
            nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 1.5, 1.0])), f'{tmp}/scan{i:04d}.nii.gz')
        dls = ct_ssl_dls(tmp, crop=args.crop, bs=2, cache_dir=f'{tmp}/cache', num_workers=args.num_workers,
                         progress=False)
        base = _TreeRSS._rss_kib(os.getpid())
        t0 = time.perf_counter()
        with _TreeRSS() as tree:
            n = sum(v1.shape[0] for _ in range(args.epochs) for v1, _ in dls.train)
        rate = n / (time.perf_counter() - t0)
    print(f'{args.synthetic} synthetic scans, crop {args.crop}^3, num_workers={args.num_workers}: {rate:.1f} samples/s; '
          f'steady-state memory (PSS, process + workers) {(tree.peak - base) / 1024:.0f} MiB above the process '
          f'before the epochs (peak {tree.peak / 1024:.0f} MiB)')


if __name__ == '__main__':
    main()
