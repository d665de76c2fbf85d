"""The stage's window-order token layout (`SwinStage.window_layout`) against the grid layout, in one process.

    python bench/bench_window_layout.py                          # swin-tiny and swin-smit at 64^3, batch 2
    python bench/bench_window_layout.py --presets swin-smit --size 96 --batch 1

The grid layout permutes the tokens into each block's windows and back (two gathers per block, forward and backward)
and copies them for patch merging; the window layout keeps a stage's tokens in the current block's window order
(`depth + 1` gathers per stage). Both run on the same model, the same input and the same random draws, their steps
alternated (a drifting shared machine hits both alike); median of `--reps` per layout. Forward + backward (the
student) and forward under `no_grad` (the teacher). The forward outputs are checked equal before any timing.

Only the SDPA and reference paths permute tokens: on a GPU with Triton the fused kernel addresses windows in grid
order and this setting has no effect there.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def _set_layout(enc, on: bool) -> None:
    from dagman_fast.swin import SwinStage
    for m in enc.modules():
        if isinstance(m, SwinStage):
            m.window_layout = on


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--presets', nargs='+', default=['swin-tiny', 'swin-smit'])
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()

    import torch
    from fastprogress.fastprogress import progress_bar

    from dagman_fast.swin import build_encoder
    torch.set_num_threads(args.threads)
    print(f'CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}')
    print(f'{"preset":<10} {"pass":<14} {"grid (s)":>9} {"window (s)":>11} {"ratio":>6}')
    for preset in args.presets:
        torch.manual_seed(0)
        enc = build_encoder(preset, img_size=args.size)
        x = torch.randn(args.batch, 1, args.size, args.size, args.size)
        with torch.no_grad():  # the two layouts must agree before their times mean anything
            outs = []
            for on in (False, True):
                _set_layout(enc, on)
                torch.manual_seed(1)  # the same drop-path draws
                outs.append(enc(x).features[-1])
            assert torch.equal(*outs), 'the window layout changed the forward'

        def fwd_bwd():
            enc.zero_grad(set_to_none=True)
            sum(f.square().mean() for f in enc(x).features).backward()

        def fwd():
            with torch.no_grad():
                enc(x)

        for name, step in (('fwd+bwd', fwd_bwd), ('fwd no_grad', fwd)):
            times = {False: [], True: []}
            for on in (False, True):  # warm-up
                _set_layout(enc, on)
                step()
            for _ in progress_bar(range(args.reps), leave=False):
                for on in (False, True):
                    _set_layout(enc, on)
                    t0 = time.perf_counter()
                    step()
                    times[on].append(time.perf_counter() - t0)
            g, w = statistics.median(times[False]), statistics.median(times[True])
            print(f'{preset:<10} {name:<14} {g:>9.3f} {w:>11.3f} {g / w:>5.2f}x')


if __name__ == '__main__':
    main()
