"""`preprocess_scans` (`dagman preprocess`) at scale: a synthetic corpus of 10,000 small CT volumes with a few bad
files, preprocessed into a cache with its index by worker processes; then the construction of `ct_ssl_dls` from the
complete index against the old path that verifies every scan (no index).

    python bench/bench_preprocess.py --workers 2               # 10,000 volumes of 24..32^3, crop 32
    python bench/bench_preprocess.py --n 1000 --workers 4      # a quick look

The corpus and the cache go to a temporary folder outside the repository (removed at the end unless --keep).
Reported: scans per second, the cost per scan over the first and the last thousand (it must stay flat), index and
cache size on disk, peak memory of the main process and of the workers (VmHWM from /proc, polled), and the
`ct_ssl_dls` construction times. Writes bench/results/preprocess_<n>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / 'results'


def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    "Children, grandchildren...: the forkserver is a child of this process and the workers are its children."
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for t in Path(f'/proc/{p}/task').iterdir()
                    for k in (t / 'children').read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


class _Monitor:
    """Polls, in a thread, the journal of the running preprocess (rows done against time) and the peak memory of every
    descendant process (VmHWM: its high-water mark, so that a short peak between polls is not missed)."""

    def __init__(self, cache: Path, interval: float = 0.25):
        self.cache, self.interval, self.samples, self.hwm = cache, interval, [], {}
        self.peak_sum, self._stop, self.t0, self.end = 0, threading.Event(), time.perf_counter(), None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rows(self) -> int:
        for j in self.cache.glob('*/index.journal.csv'):
            try:
                with open(j, 'rb') as f:
                    return max(0, sum(1 for _ in f) - 1)
            except OSError:
                return 0
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, self._rows()))
            rss = 0
            for pid in _descendants(os.getpid()):
                self.hwm[pid] = max(self.hwm.get(pid, 0), _kib(pid, 'VmHWM'))
                rss += _kib(pid, 'VmRSS')
            self.peak_sum = max(self.peak_sum, rss + _kib(os.getpid(), 'VmRSS'))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.end = time.perf_counter() - self.t0  # the journal is gone once the run ends: its last rows count here
        self._stop.set()
        self._thread.join()

    def time_at(self, rows: int) -> float:
        "The first time the journal held at least `rows` rows (to the polling interval)."
        return next((t for t, r in self.samples if r >= rows), self.end)


def make_corpus(folder: Path, n: int, sizes, n_bad: int) -> int:
    "`n` synthetic volumes, their sizes cycling through `sizes`, plus `n_bad` bad files; returns the count of bad."
    import nibabel as nib
    import numpy as np

    from dagman_fast.data import synthetic_ct
    # Chunks of 10 volumes per size, so that every thousand (in search order) mixes the sizes alike: the cost per scan
    # of the first and the last thousand then compares like with like.
    done, chunk = 0, 0
    while done < n:
        for s in sizes:
            m = min(10, n - done)
            if m > 0:
                synthetic_ct(folder / f'chunk{chunk:04d}' / f'size{s}', n=m, size=s, seed=chunk * len(sizes) + s)
                done += m
        chunk += 1
    bad = folder / 'bad'
    bad.mkdir()
    kinds = ['corrupt', 'tiny', 'flat']
    for i in range(n_bad):
        kind = kinds[i % len(kinds)]
        p = bad / f'{kind}_{i:02d}.nii.gz'
        if kind == 'corrupt':
            p.write_bytes(b'not a NIfTI file')
        else:
            vol = np.arange(8.0).reshape(2, 2, 2) * 100 if kind == 'tiny' else np.full((24, 24, 24), 40.0)
            nib.save(nib.Nifti1Image(vol.astype(np.int16), np.eye(4)), str(p))
    return n_bad


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def _cpu() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--n', type=int, default=10_000, help='synthetic volumes (default 10000)')
    ap.add_argument('--sizes', type=int, nargs='+', default=[24, 26, 28, 30, 32], help='volume sides (mixed)')
    ap.add_argument('--bad', type=int, default=12, help='bad files sprinkled in (default 12)')
    ap.add_argument('--crop', type=int, default=32)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--compare', type=int, default=None,
                    help='scans for the ct_ssl_dls construction comparison (default: all)')
    ap.add_argument('--keep', action='store_true', help='keep the temporary corpus and cache')
    args = ap.parse_args()
    import torch

    from dagman_fast.data import ct_ssl_dls, find_ct_scans
    from dagman_fast.preprocess import preprocess_scans
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix='dagman_bench_preprocess_'))
    data, cache = root / 'ct', root / 'cache'
    res: dict = dict(n_volumes=args.n, sizes=args.sizes, crop=args.crop, workers=args.workers, cpu=_cpu(),
                     cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__)
    try:
        t = time.perf_counter()
        res['n_bad'] = make_corpus(data, args.n, args.sizes, args.bad)
        res['corpus_seconds'] = round(time.perf_counter() - t, 1)
        res['corpus_mib'] = round(_size(data.rglob('*.nii.gz')) / 2 ** 20, 1)
        print(f"corpus: {args.n} volumes + {res['n_bad']} bad files, {res['corpus_mib']} MiB, "
              f"{res['corpus_seconds']} s", flush=True)

        with _Monitor(cache) as mon:
            out = preprocess_scans(data, cache, crop=args.crop, workers=args.workers, progress=False)
        total = out['scans']
        t_first = mon.time_at(1)
        first = (mon.time_at(1001) - mon.time_at(1)) / 1000 if total > 1001 else None
        last = (mon.time_at(total) - mon.time_at(total - 1000)) / 1000 if total > 2000 else None
        folder = cache / out['key']
        res.update(scans=total, ok=out['ok'], skipped=len(out['skipped']), seconds=round(out['seconds'], 1),
                   scans_per_s=round(total / out['seconds'], 1),
                   scans_per_s_after_start=round((total - 1) / (mon.time_at(total) - t_first), 1),
                   startup_s=round(t_first, 1),
                   ms_per_scan_first_1000=None if first is None else round(1e3 * first, 2),
                   ms_per_scan_last_1000=None if last is None else round(1e3 * last, 2),
                   last_over_first=None if first is None or last is None else round(last / first, 3),
                   index_kib=round((folder / 'index.csv').stat().st_size / 2 ** 10, 1),
                   cache_mib=round(_size(folder.glob('*.pt')) / 2 ** 20, 1),
                   main_peak_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10, 1),
                   worker_peak_mib=round(max((v for p, v in mon.hwm.items()), default=0) / 2 ** 10, 1),
                   tree_peak_rss_mib=round(mon.peak_sum / 2 ** 10, 1))
        print(json.dumps(res, indent=1), flush=True)

        t = time.perf_counter()
        again = preprocess_scans(data, cache, crop=args.crop, workers=args.workers, progress=False)
        res['rerun_finished_s'] = round(time.perf_counter() - t, 2)
        assert again['processed'] == 0, again

        scans = find_ct_scans(data, on_error='skip', skipped=[])
        scans = scans[:args.compare] if args.compare else scans
        res['compare_scans'] = len(scans)
        kw = dict(crop=args.crop, bs=2, cache_dir=cache, on_error='skip', progress=False)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            t = time.perf_counter()
            n_idx = len(ct_ssl_dls(scans, **kw).volumes)
            res['dls_with_index_s'] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            n_none = len(ct_ssl_dls(None, **kw).volumes)
            res['dls_from_index_only_s'] = round(time.perf_counter() - t, 2)
            (folder / 'index.csv').rename(folder / 'index.csv.aside')  # the old path: every scan verified
            t = time.perf_counter()
            n_old = len(ct_ssl_dls(scans, **kw).volumes)
            res['dls_without_index_s'] = round(time.perf_counter() - t, 2)
            (folder / 'index.csv.aside').rename(folder / 'index.csv')
        res['dls_volumes'] = [n_idx, n_none, n_old]
        res['dls_speedup'] = round(res['dls_without_index_s'] / max(res['dls_with_index_s'], 1e-3), 1)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    res['command'] = f'python bench/bench_preprocess.py --n {args.n} --workers {args.workers}' + (
        f' --compare {args.compare}' if args.compare else '')
    write(res)


def write(res: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    name = f"preprocess_{res['n_volumes'] // 1000}k" if res['n_volumes'] % 1000 == 0 else f"preprocess_{res['n_volumes']}"
    (RESULTS / f'{name}.json').write_text(json.dumps(res, indent=1) + '\n')
    rows = [
        ('scans (ok / skipped)', f"{res['scans']} ({res['ok']} / {res['skipped']})"),
        ('wall time', f"{res['seconds']} s (worker start-up {res['startup_s']} s)"),
        ('scans per second', f"{res['scans_per_s']} ({res['scans_per_s_after_start']} after start-up)"),
        ('ms per scan, first 1000', res['ms_per_scan_first_1000']),
        ('ms per scan, last 1000', res['ms_per_scan_last_1000']),
        ('last / first', res['last_over_first']),
        ('index.csv', f"{res['index_kib']} KiB"),
        ('cache (*.pt)', f"{res['cache_mib']} MiB (corpus {res['corpus_mib']} MiB of .nii.gz)"),
        ('peak memory, main process', f"{res['main_peak_mib']} MiB"),
        ('peak memory, one worker', f"{res['worker_peak_mib']} MiB"),
        ('peak RSS summed over all processes (shared pages counted in each)', f"{res['tree_peak_rss_mib']} MiB"),
        ('re-run on the finished cache', f"{res['rerun_finished_s']} s"),
        (f"ct_ssl_dls over {res['compare_scans']} scans, with the index", f"{res['dls_with_index_s']} s"),
        ('ct_ssl_dls(None, cache_dir=...) (the index alone)', f"{res['dls_from_index_only_s']} s"),
        ('ct_ssl_dls without the index (every scan verified)', f"{res['dls_without_index_s']} s"),
    ]
    table = '| measure | value |\n|---|---|\n' + '\n'.join(f'| {k} | {v} |' for k, v in rows)
    md = (f"### Preprocessing {res['n_volumes']:,} scans (`dagman preprocess`)\n\n"
          f"{res['n_volumes']:,} synthetic volumes of {min(res['sizes'])}..{max(res['sizes'])}^3 voxels at 2 mm with "
          f"{res['n_bad']} bad files (corrupt, too small, a single value), crop {res['crop']}, {res['workers']} worker "
          f"processes on a {res['cores']}-core {res['cpu']} (shared with other jobs, so times are upper bounds); "
          f"Python {res['python']}, torch {res['torch']}.\n\n{table}\n\n"
          f"The cost per scan {'stays flat' if (res['last_over_first'] or 9) < 1.2 else 'does not stay flat'} (last "
          f"/ first thousand: {res['last_over_first']}; the sizes are mixed alike in both). Building the loader from "
          f"the complete index reads no scan and no cache file: {res['dls_speedup']}x faster than verifying every "
          f"scan. Reproduce with `{res['command']}`.\n")
    (RESULTS / f'{name}.md').write_text(md)
    print(table)


if __name__ == '__main__':
    sys.exit(main())
