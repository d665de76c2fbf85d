"""Peak memory and time of one DAGMaN pretraining step with and without gradient checkpointing (issue 12).

    python bench/bench_checkpointing.py                     # swin-smit, 96^3, batch 1 per view, 2 views, CPU
    python bench/bench_checkpointing.py --size 64 --settings False True

The step is what a training batch does: the teacher's guide (no grad, with the noisy teacher's patch dropout), the
student's forward on both views with the teacher's cell mask, `model.loss` (all four terms) and the backward. Each
`use_checkpoint` setting runs in a fresh subprocess: one warm-up step (it also allocates the parameter gradients,
which fastai then zeroes in place, so they are part of the resident set before the step), then

- RSS: the rise of the peak resident set during one step above the resident set before it (Linux `VmHWM`, reset
  through `/proc/self/clear_refs`, minus `VmRSS`), with glibc told to return large blocks to the OS at once
  (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) so that the resident set follows the live tensors;
- profiler: the same step under `torch.profiler` with `profile_memory=True`: the running sum of the CPU
  allocator's allocation and free events, whose maximum is the exact peak of live tensor bytes (workspaces outside
  PyTorch's allocator, e.g. oneDNN's, are not in it), and where it happens (teacher, student, loss or backward);
- time: one more step in another subprocess without the glibc settings (which slow allocation).
Results go to `bench/results/checkpointing_<size>.json` and `.md`.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ('teacher', 'student', 'loss', 'backward')


sys.path.insert(0, str(Path(__file__).parent))
from bench_encoder import _reset_peak, _status_kib  # noqa: E402  the same /proc readings as the encoder benchmark


def _status_mib(field: str) -> float:
    return _status_kib(field) / 1024


def _profiled_peak(prof) -> dict:
    "Peak of live CPU tensor bytes (MiB) over the profiled step, and the phase it falls in; each phase's own peak."
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]')
    spans = {e.name()[3:]: (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
             if e.name().startswith('## ')}
    cur, peak, where = 0, 0, None
    phase_peak = dict.fromkeys(PHASES, 0.0)
    for t, n in mem:
        cur += n
        phase = next((p for p, (a, b) in spans.items() if a <= t <= b), None)
        if phase is not None:
            phase_peak[phase] = max(phase_peak[phase], cur / 2 ** 20)
        if cur > peak:
            peak, where = cur, phase
    return dict(peak_mib=peak / 2 ** 20, peak_phase=where, phase_peak_mib=phase_peak)


def worker(args) -> dict:
    "One subprocess: build the model, warm up, measure one step (memory or time)."
    import torch
    from torch.autograd.profiler import record_function

    torch.set_num_threads(args.threads)
    from dagman_fast.model import DAGMaNConfig, DAGMaNModel
    from dagman_fast.encoder_configs import encoder_config

    torch.manual_seed(0)
    use_checkpoint = ast.literal_eval(args.setting)
    cfg = encoder_config(args.preset, img_size=args.size, use_checkpoint=use_checkpoint, attn_impl=args.attn_impl)
    model = DAGMaNModel(cfg, DAGMaNConfig()).train()
    g = torch.Generator().manual_seed(1)
    views = [torch.rand(args.batch, 1, args.size, args.size, args.size, generator=g) for _ in range(2)]
    patches = model.patch_grid(views[0].shape[2:])
    drop_mask = torch.rand(2 * args.batch, *patches, generator=g) < 0.1  # the noisy teacher's patch dropout

    def step():
        for p in model.parameters():  # fastai's zero_grad: in place, the gradients stay allocated
            if p.grad is not None:
                p.grad.zero_()
        with record_function('## teacher'):
            guide = model.guide(views, drop_mask, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        with record_function('## student'):
            pred = model(*views, cell_mask=guide['cell_mask'])
        with record_function('## loss'):
            loss = model.loss(pred, guide)
        with record_function('## backward'):
            loss.backward()
        return loss.item()

    step()  # warm-up: allocator caches, window plans, parameter gradients
    grad_mib = sum(p.numel() * p.element_size() for p in model.parameters() if p.grad is not None) / 2 ** 20
    res = dict(setting=args.setting, checkpoint_stages=list(cfg.checkpoint_stages), grad_mib=grad_mib)
    if args.measure == 'time':
        t0 = time.perf_counter()
        res['loss'] = step()
        res['step_s'] = time.perf_counter() - t0
        return res
    import gc
    gc.collect()
    exact = _reset_peak()
    before = _status_mib('VmRSS')
    res['loss'] = step()
    res.update(rss_before_mib=before, rss_peak_mib=_status_mib('VmHWM') - before, exact_rss_peak=exact)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    res.update(_profiled_peak(prof))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='swin-smit')
    p.add_argument('--size', type=int, default=96)
    p.add_argument('--batch', type=int, default=1, help='per view (2 views)')
    p.add_argument('--settings', nargs='+', default=['False', '(1,)', '(1, 2)', 'True'],
                   help='use_checkpoint values, as Python literals')
    p.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument('--attn-impl', default='auto')
    p.add_argument('--out-dir', default=str(Path(__file__).parent / 'results'))
    p.add_argument('--setting', help=argparse.SUPPRESS)
    p.add_argument('--measure', choices=['time', 'memory'], help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:  # a worker subprocess
        Path(args.out).write_text(json.dumps(worker(args)))
        return

    import torch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(measure, setting):
            out = Path(tmp) / 'result.json'
            cmd = [sys.executable, __file__, '--measure', measure, '--out', str(out), '--setting', setting,
                   '--preset', args.preset, '--size', str(args.size), '--batch', str(args.batch),
                   '--threads', str(args.threads), '--attn-impl', args.attn_impl]
            env = dict(os.environ)
            if measure == 'memory':
                env.update(MALLOC_MMAP_THRESHOLD_='131072', MALLOC_TRIM_THRESHOLD_='0')
            subprocess.run(cmd, check=True, env=env)
            return json.loads(out.read_text())

        for setting in args.settings:
            row = run('memory', setting)
            row.update({k: v for k, v in run('time', setting).items() if k in ('step_s',)})
            rows.append(row)
            print(f'{setting}: RSS {row["rss_peak_mib"]:.0f} MiB, profiler {row["peak_mib"]:.0f} MiB '
                  f'({row["peak_phase"]}), {row["step_s"]:.1f} s', flush=True)
    base = next((r for r in rows if r['setting'] == 'False'), rows[0])
    for r in rows:
        r['rss_ratio'] = r['rss_peak_mib'] / base['rss_peak_mib']
        r['profiler_ratio'] = r['peak_mib'] / base['peak_mib']
        r['time_ratio'] = r['step_s'] / base['step_s']
    cpu = next((line.split(':', 1)[1].strip() for line in subprocess.run(['lscpu'], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith('Model name')), platform.processor() or platform.machine())
    cmd = (f'python bench/bench_checkpointing.py --preset {args.preset} --size {args.size} --batch {args.batch} '
           f'--settings ' + ' '.join(f'"{s}"' for s in args.settings))
    meta = dict(cpu=cpu, threads=args.threads, torch=torch.__version__, preset=args.preset, size=args.size,
                batch_per_view=args.batch, views=2, attn_impl=args.attn_impl, dtype='float32', command=cmd)
    head = ('| `use_checkpoint` | stages | peak RSS rise (MiB) | ratio | profiler peak (MiB) | ratio | where | '
            'step (s) | time ratio |\n|---|---|---|---|---|---|---|---|---|')
    lines = [f'| `{r["setting"]}` | {",".join(map(str, r["checkpoint_stages"])) or "-"} | {r["rss_peak_mib"]:.0f} | '
             f'{r["rss_ratio"]:.2f} | {r["peak_mib"]:.0f} | {r["profiler_ratio"]:.2f} | {r["peak_phase"]} | '
             f'{r["step_s"]:.1f} | {r["time_ratio"]:.2f} |' for r in rows]
    table = '\n'.join([head] + lines)
    print(f'\nCPU: {cpu}, {args.threads} threads; torch {torch.__version__}; {args.preset}, {args.size}^3, batch '
          f'{args.batch} per view, 2 views, fp32, attn_impl={args.attn_impl!r}; one pretraining step\n')
    print(table)
    for r in rows:
        print(f'{r["setting"]}: profiler peak per phase (MiB): '
              + ', '.join(f'{k} {v:.0f}' for k, v in r['phase_peak_mib'].items()))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f'checkpointing_{args.size}'
    stem.with_suffix('.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + '\n')
    phases = '\n'.join(f'| `{r["setting"]}` | ' + ' | '.join(f'{r["phase_peak_mib"][k]:.0f}' for k in PHASES) + ' |'
                       for r in rows)
    stem.with_suffix('.md').write_text(
        f'### Gradient checkpointing: one pretraining step at {args.size}^3 (CPU)\n\n'
        f'{args.preset}, crop {args.size}^3, batch {args.batch} per view, 2 views, fp32, `attn_impl={args.attn_impl!r}`; '
        f'the step is the teacher\'s guide, the student\'s forward, `model.loss` and the backward. {cpu}, '
        f'{args.threads} threads, torch {torch.__version__}. Each setting in a fresh process after one warm-up step '
        f'(parameter gradients allocated, as fastai keeps them). Peak RSS rise: `VmHWM` after the step minus `VmRSS` '
        f'before it; profiler peak: maximum of the running sum of `torch.profiler` (`profile_memory=True`) '
        f'allocation events. Other jobs may have shared the cores: times are indicative.\n\n'
        f'```\n{cmd}\n```\n\n{table}\n\nProfiler peak per phase (MiB):\n\n| `use_checkpoint` | '
        + ' | '.join(PHASES) + ' |\n' + '|---' * (len(PHASES) + 1) + '|\n' + phases + '\n')


if __name__ == '__main__':
    main()
