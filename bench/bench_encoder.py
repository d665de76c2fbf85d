"""Encoder forward+backward: dagman_fast's SwinEncoder against MONAI's SwinTransformer with identical weights.

    python bench/bench_encoder.py                       # swin-smit, 64^3, batch 2, fp32, CPU (the issue's setting)
    python bench/bench_encoder.py --size 96 --batch 1 --reps 3
    python bench/bench_encoder.py --amp bf16            # both under CPU bf16 autocast (fast where the CPU has AVX512-BF16/AMX)

Same weights, same input, same loss (mean squared distance of each of the five normalised maps to a fixed random
target, summed: the two losses agree only if the maps do).

Time: one subprocess holds both models and alternates their steps (drifts of a shared machine hit both alike);
median of `--reps` steps each, after `--warmup`. Run it on an idle machine: two processes competing for 2 cores
slow PyTorch's spinning OpenMP threads by an order of magnitude.

FLOPs: counted once per model with `count_flops` (PyTorch's `FlopCounterMode`) on one step, ours through the reference
attention path (plain matmuls the counter knows), MONAI's as it runs: two independent counts of the same network.
Achieved TFLOP/s = FLOPs / median time; MFU = that over the CPU's measured matmul peak in the step's dtype.

Peak memory: each model in its own fresh subprocess; the rise of the peak resident set during one step above the
resident set before it (Linux `VmHWM`, reset through `/proc/self/clear_refs`), i.e. activations, gradients and
workspace, with glibc told to return large blocks to the OS at once so the resident set follows live tensors.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _reset_peak() -> bool:
    try:
        Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(args) -> dict:
    """One subprocess. 'time': both models, their steps interleaved (so drifts of a shared machine hit both alike).
    'memory': one model, the peak of one step."""
    import gc

    import torch

    torch.set_num_threads(args.threads)
    from dagman_fast.monai_interop import to_monai
    from dagman_fast.swin import build_encoder

    torch.manual_seed(0)
    ours = build_encoder(args.preset, sa_stage=None, drop_path_rate=0.0, attn_impl=args.attn_impl).train()
    theirs = to_monai(ours, as_module=True).train()
    models = {'ours': (ours, ours.forward_features), 'monai': (theirs, functools.partial(theirs.forward, normalize=True))}
    del ours, theirs  # `models` holds them; in a memory worker only the measured one stays alive
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size, generator=gen)
    with torch.no_grad():  # a fixed random target per map, so that equal losses mean equal maps
        targets = [torch.randn(f.shape, generator=gen) for f in models['ours'][1](x)]

    amp = args.amp == 'bf16'

    def step(impl):
        model, run = models[impl]
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = sum((f.float() - t).pow(2).mean() for f, t in zip(run(x), targets))
        loss.backward()
        return loss.item()

    if args.measure == 'memory':
        models = {args.impl: models[args.impl]}
        for _ in range(args.warmup):
            step(args.impl)
        models[args.impl][0].zero_grad(set_to_none=True)
        gc.collect()
        exact = _reset_peak()
        base = _status_kib('VmRSS')
        loss = step(args.impl)
        return {args.impl: dict(loss=loss, peak_mib=(_status_kib('VmHWM') - base) / 1024, exact_peak=exact)}
    runs = models
    res = {impl: dict(times=[]) for impl in runs}
    from dagman_fast.train_utils import count_flops
    counted = build_encoder(args.preset, sa_stage=None, drop_path_rate=0.0, attn_impl='reference').train()
    counted.load_state_dict(models['ours'][0].state_dict())
    models['ours-counted'] = (counted, counted.forward_features)
    for impl in list(res):
        res[impl]['flops'] = count_flops(step, 'ours-counted' if impl == 'ours' else impl)[1]
    del models['ours-counted'], counted
    for _ in range(args.warmup):
        for impl in runs:
            step(impl)
    for _ in range(args.reps):
        for impl in runs:
            t0 = time.perf_counter()
            res[impl]['loss'] = step(impl)
            res[impl]['times'].append(time.perf_counter() - t0)
    for r in res.values():
        r['median_s'] = statistics.median(r['times'])
    return res


def _cpu_model() -> str:
    "The CPU model as `lscpu` names it (CPU timings are only comparable on one model)."
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='swin-smit')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument('--attn-impl', default='auto')
    p.add_argument('--amp', choices=['fp32', 'bf16'], default='fp32', help='bf16: both models under CPU bf16 autocast')
    p.add_argument('--impl', choices=['ours', 'monai'], help=argparse.SUPPRESS)
    p.add_argument('--measure', choices=['time', 'memory'], help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:  # a worker subprocess
        Path(args.out).write_text(json.dumps(worker(args)))
        return

    import torch
    import monai
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        def run(measure, impl=None):
            out = Path(tmp) / 'result.json'
            cmd = [sys.executable, __file__, '--measure', measure, '--out', str(out)] + (['--impl', impl] if impl else [])
            cmd += [f'--{k.replace("_", "-")}={v}' for k, v in vars(args).items() if k not in ('impl', 'measure', 'out')]
            env = dict(os.environ)
            if measure == 'memory':
                # Large blocks straight from and back to the OS, so the resident set follows the live tensors of
                # each model alike (glibc would otherwise keep freed memory in its arenas). This slows allocation,
                # which is why time is measured in another process without it.
                env.update(MALLOC_MMAP_THRESHOLD_='131072', MALLOC_TRIM_THRESHOLD_='0')
            subprocess.run(cmd, check=True, env=env)
            return json.loads(out.read_text())

        res = run('time')
        for impl in ('monai', 'ours'):
            res[impl].update(run('memory', impl)[impl])
    m, o = res['monai'], res['ours']
    from dagman_fast.train_utils import mfu, peak_tflops
    torch.set_num_threads(args.threads)
    peak, source = peak_tflops('cpu', torch.bfloat16 if args.amp == 'bf16' else torch.float32)
    print(f'device: CPU ({_cpu_model()}), {args.threads} threads; torch {torch.__version__}, '
          f'monai {monai.__version__}; {args.preset}, {args.size}^3, batch {args.batch}, {args.amp}, forward+backward')
    print(f'FLOPs of one step: ours {o["flops"] / 1e9:.2f} G, MONAI {m["flops"] / 1e9:.2f} G (counted apart); '
          f'CPU peak {peak:.3f} TFLOP/s ({source})')
    print(f'{"":8}{"median s":>10}{"peak MiB":>10}{"TFLOP/s":>9}{"MFU":>7}  steps (s)')
    for name, r in (('MONAI', m), ('ours', o)):
        rate = r['flops'] / r['median_s'] / 1e12
        print(f'{name:8}{r["median_s"]:10.3f}{r["peak_mib"]:10.0f}{rate:9.3f}{mfu(r["flops"], r["median_s"], peak):7.1%}  '
              + ' '.join(f'{t:.3f}' for t in r['times']))
    print(f'loss: MONAI {m["loss"]:.6f}, ours {o["loss"]:.6f} (same weights, input and targets)')
    print(f'speed-up (MONAI time / ours): {m["median_s"] / o["median_s"]:.2f}x   '
          f'peak memory ratio (ours / MONAI): {o["peak_mib"] / m["peak_mib"]:.2f}')
    if not (o['exact_peak'] and m['exact_peak']):
        print('note: /proc/self/clear_refs was not writable; peaks include the whole process history')


if __name__ == '__main__':
    main()
