"""Turn `bench/gpu_check.sh`'s results into the tables of `BENCHMARKS.md`, measured against the kernel targets.

    python bench/gpu_summary.py OUT_DIR    # reads OUT_DIR/env.txt, kernels.json, flex.json, pretrain.json; prints markdown

Targets (the kernel issue): the Triton window attention forward at least 2x eager, 1.3x SDPA and 60% of the memory
roofline; forward+backward at least 1.5x eager and 1.2x SDPA. Ratios are medians of the same run.
Targets (the step issue, on an H100/H200): the encoder forward+backward (swin-smit, 2 x 128^3) at most 15 ms, the DAGMaN
step (batch 2 x 2 views) at most 40 ms; each with its TFLOP/s and MFU (FLOPs counted with `count_flops`, over the
data-sheet bf16 peak of `PEAK_TFLOPS`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {'attn-fwd': {'eager': 2.0, 'sdpa': 1.3}, 'attn-fwdbwd': {'eager': 1.5, 'sdpa': 1.2}}
ROOFLINE_TARGET = 60.0
ENCODER_MS_TARGET, STEP_MS_TARGET = 15.0, 40.0
# bf16 dense peaks in TFLOP/s (NVIDIA data sheets; the library's `train_utils.PEAK_TFLOPS`, repeated so that this
# script runs without the package)
PEAK_BF16 = {'A100': 312.0, 'H100 PCIe': 756.0, 'H100': 989.0, 'H200': 989.0}


def peak_bf16(device: str) -> float | None:
    key = max((k for k in PEAK_BF16 if k in (device or '')), key=len, default=None)
    return PEAK_BF16[key] if key else None


def _mfu_cells(flops, seconds, device) -> str:
    "`TFLOP/s | MFU` cells: achieved rate and its share of the device's bf16 peak (blank when not known)."
    if not flops or not seconds:
        return ' | '
    rate = flops / seconds / 1e12
    peak = peak_bf16(device)
    return f'{rate:.1f} | ' + (f'{100 * rate / peak:.1f}%' if peak else '')


def _verdict(ok: bool) -> str:
    return 'meets' if ok else '**misses**'


def kernel_tables(bench: dict) -> list[str]:
    rows: dict[str, dict[str, dict]] = {}
    for b in bench['benchmarks']:
        key = next(iter(b['params'].values())) if b.get('params') else b['name']  # the path / impl
        rows.setdefault(b['group'], {})[str(key)] = b
    lines = []
    for group in ('attn-fwd', 'attn-fwdbwd', 'topk-mask', 'encoder-fwdbwd'):
        res = rows.get(group)
        if not res:
            lines += [f'\n### {group}\n', 'not measured (no results in kernels.json)']
            continue
        shape = next((r['extra_info'].get('shape') for r in res.values() if r['extra_info'].get('shape')), None)
        lines += [f'\n### {group}' + (f' ({shape})' if shape else '') + '\n',
                  '| path | median ms | min ms | peak MiB | roofline % | TFLOP/s | MFU |', '|---|---|---|---|---|---|---|']
        for name, r in res.items():
            s, e = r['stats'], r['extra_info']
            roof = e.get('roofline_pct', '') if e.get('bytes') else ''  # the encoder group counts no bytes
            lines.append(f"| {name} | {1e3 * s['median']:.3f} | {1e3 * s['min']:.3f} | {e.get('peak_mib', '')} | {roof} | "
                         f"{_mfu_cells(e.get('flops'), s['median'], e.get('device'))} |")
        if group == 'encoder-fwdbwd':
            best = min(res.items(), key=lambda kv: kv[1]['stats']['median'])
            ms = 1e3 * best[1]['stats']['median']
            lines.append(f'\nfastest encoder path: {best[0]}, {ms:.1f} ms (target at most {ENCODER_MS_TARGET:g} ms: '
                         f'{_verdict(ms <= ENCODER_MS_TARGET)})')
        fast = res.get('triton')
        base = res.get('reference') if group == 'encoder-fwdbwd' else res.get('eager') or res.get('torch')
        if fast and group in TARGETS:
            for other, target in TARGETS[group].items():
                if other in res:
                    ratio = res[other]['stats']['median'] / fast['stats']['median']
                    lines.append(f'\nTriton vs {other}: {ratio:.2f}x (target {target}x: {_verdict(ratio >= target)})')
            roof = fast['extra_info'].get('roofline_pct')
            if group == 'attn-fwd' and roof is not None:
                lines.append(f'\nTriton forward at {roof}% of the memory roofline (target {ROOFLINE_TARGET}%: '
                             f'{_verdict(roof >= ROOFLINE_TARGET)})')
        elif fast and base:
            lines.append(f"\nTriton vs {'eager' if group != 'topk-mask' else 'torch'}: "
                         f"{base['stats']['median'] / fast['stats']['median']:.2f}x")
    return lines


def pretrain_table(pre: dict) -> list[str]:
    secs = pre['seconds_per_step']
    flops = pre.get('flops', {})
    lines = [f"\n### Pretraining step ({pre['encoder']}, {pre['crop']}^3 crops, batch {pre['bs']} x 2 views, "
             f"{pre['steps']} timed steps)\n", '| run | s/step | data s | peak GiB | TFLOP/s | MFU |',
             '|---|---|---|---|---|---|']
    for k, v in secs.items():
        f = flops.get(k.split('@')[0].split('/')[0].split('+')[0])
        data = pre.get('parts', {}).get(k, {}).get('data')
        lines.append(f"| {k} | {v:.3f} | {'' if data is None else f'{data:.3f}'} | {pre['peak_gib'].get(k) or 0:.2f} | "
                     f"{_mfu_cells(f, v, pre.get('device'))} |")
    best = min(secs.items(), key=lambda kv: kv[1])
    lines.append(f'\nfastest step: {best[0]}, {1e3 * best[1]:.1f} ms (target at most {STEP_MS_TARGET:g} ms on an '
                 f'H100/H200: {_verdict(1e3 * best[1] <= STEP_MS_TARGET)})')
    ref = next((v for k, v in secs.items() if k.endswith('/reference')), None)
    for k, v in secs.items():
        if ref and not k.endswith('/reference'):
            lines.append(f'\n{k}: {ref / v:.2f}x the step with eager attention')
    return lines


def _load(f: Path) -> dict:
    "A part's JSON, or {} where the part failed before writing it (pytest-benchmark leaves an empty file then)."
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def main(out: Path) -> int:
    lines = ['## GPU check']
    env = out / 'env.txt'
    lines += ['', '```', env.read_text().strip() if env.exists() else 'env.txt missing', '```']
    kj, fj, pj, cj = out / 'kernels.json', out / 'flex.json', out / 'pretrain.json', out / 'compiled.json'
    bench = {'benchmarks': [b for f in (kj, fj, cj) for b in _load(f).get('benchmarks', [])]}
    lines += kernel_tables(bench) if bench['benchmarks'] else ['\nkernels.json missing: not measured']
    pre = _load(pj)
    for extra in (out / 'pretrain_compiled.json',):  # the optional 'compiled' part
        more = _load(extra)
        if more and not pre:
            pre = more
        elif more:
            for key in ('seconds_per_step', 'parts', 'peak_gib', 'flops'):
                pre.setdefault(key, {}).update(more.get(key, {}))
    lines += pretrain_table(pre) if pre else ['\npretrain.json missing: not measured']
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else 'gpu_check_out')))
