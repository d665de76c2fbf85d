"""Turn `bench/gpu_check.sh`'s results into the tables of `BENCHMARKS.md`, measured against the kernel targets.

    python bench/gpu_summary.py OUT_DIR    # reads OUT_DIR/env.txt, kernels.json, flex.json, pretrain.json; prints markdown

Targets (the kernel issue): the Triton window attention forward at least 2x eager, 1.3x SDPA and 60% of the memory
roofline; forward+backward at least 1.5x eager and 1.2x SDPA. Ratios are medians of the same run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {'attn-fwd': {'eager': 2.0, 'sdpa': 1.3}, 'attn-fwdbwd': {'eager': 1.5, 'sdpa': 1.2}}
ROOFLINE_TARGET = 60.0


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
                  '| path | median ms | min ms | peak MiB | roofline % |', '|---|---|---|---|---|']
        for name, r in res.items():
            s, e = r['stats'], r['extra_info']
            roof = e.get('roofline_pct', '') if e.get('bytes') else ''  # the encoder group counts no bytes
            lines.append(f"| {name} | {1e3 * s['median']:.3f} | {1e3 * s['min']:.3f} | {e.get('peak_mib', '')} | {roof} |")
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
    lines = [f"\n### Pretraining step ({pre['encoder']}, {pre['crop']}^3 crops, batch {pre['bs']} x 2 views, "
             f"{pre['steps']} timed steps)\n", '| run | s/step | peak GiB |', '|---|---|---|']
    lines += [f"| {k} | {v:.3f} | {pre['peak_gib'].get(k) or 0:.2f} |" for k, v in secs.items()]
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
    kj, fj, pj = out / 'kernels.json', out / 'flex.json', out / 'pretrain.json'
    bench = {'benchmarks': [b for f in (kj, fj) for b in _load(f).get('benchmarks', [])]}
    lines += kernel_tables(bench) if bench['benchmarks'] else ['\nkernels.json missing: not measured']
    pre = _load(pj)
    lines += pretrain_table(pre) if pre else ['\npretrain.json missing: not measured']
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else 'gpu_check_out')))
