"""What each Triton kernel variant needs on an A100 (sm_80) and an H100/H200 (sm_90), measured without a GPU.

    python bench/kernel_resources.py --json out.json            # every variant 'auto' may meet, both targets
    python bench/kernel_resources.py --json out.json --markdown table.md
    python bench/kernel_resources.py --quick                    # the paper's configuration only (the CI test's set)

Triton compiles for a GPU it does not see: `triton.compile(ASTSource(...), target=GPUTarget('cuda', 90, 32))`
gives PTX and a cubin with the `ptxas` inside the Triton wheel, and the `cuobjdump` beside it
(`--dump-resource-usage`) reports each kernel's registers and stack (spill) bytes; the dynamic shared memory a
launch needs is in the compiled kernel's metadata. Every variant is compiled with the launch configuration the
kernel module itself would use (`window_attention_config`, `topk_mask_config`), and the record says whether
`'auto'` may dispatch it (the kernel module's `fused_supported` rules), so that the report checks the policy:
every variant 'auto' may dispatch has no spill and fits the target's shared memory.

Variants: window attention forward and backward for head dims 12-128 (padded to a power of two of at least 16
inside the kernel), fp16, bf16, fp32, shifted and not, full 4^3 windows and the clipped 2^3 and 3^3 windows of small
stages (clipped windows are never shifted); 128-token windows (the kernel's limit, no preset's) at head dims 12 and
24 in 16 bits; the top-k mask kernel at the cell counts of every preset (SA after stage 1-4, AttMask's ViT at patch
16) and crop 64-160, with and without hints. A ptxas run longer than `PTXAS_TIMEOUT` is stopped and its variant
recorded as not compiling in time. A cold run (empty ~/.triton/cache) takes tens of minutes on two cores, mostly
ptxas on the fp32 variants that spill kilobytes; with Triton's cache, seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault('TRITON_DEFAULT_FP_FUSION', '1')  # Triton's default today, said out loud (silences a warning)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dagman_fast.kernels import topk_mask as tk  # noqa: E402
from dagman_fast.kernels import window_attention_triton as wa  # noqa: E402

TARGETS = {'sm_80': 80, 'sm_90': 90}
# Largest dynamic shared memory one program may opt into (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {'sm_80': 163 * 1024, 'sm_90': 227 * 1024}
DTYPES = {'fp16': '*fp16', 'bf16': '*bf16', 'fp32': '*fp32'}
HEAD_DIMS = (12, 16, 24, 32, 48, 64, 96, 128)
WINDOWS = {  # window, shifted variants
    '4x4x4': ((4, 4, 4), (False, True)),
    '2x2x2 (clipped)': ((2, 2, 2), (False,)),
    '3x3x3 (clipped)': ((3, 3, 3), (False,)),
    '8x4x4 (128 tokens)': ((8, 4, 4), (False, True)),
}
CROPS = (64, 96, 128, 160)
CUOBJDUMP = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump'
PTXAS_TIMEOUT = 180  # seconds; variants that spill kilobytes keep ptxas busy for minutes


def _ptxas_watchdog(limit: float):
    """Stop a ptxas of this report (a child of one of its worker processes) that has run longer than `limit` s: its
    variant is recorded as not compiling in time. Other processes' ptxas runs are left alone."""
    me = os.getpid()
    while True:
        time.sleep(5)
        ps = subprocess.run(['ps', '-eo', 'pid,ppid,etimes,comm'], capture_output=True, text=True).stdout.splitlines()[1:]
        rows = [line.split(None, 3) for line in ps]
        parent = {int(r[0]): int(r[1]) for r in rows if len(r) == 4}
        for pid, ppid, secs, comm in (r for r in rows if len(r) == 4):
            if comm.strip() == 'ptxas' and int(secs) > limit and parent.get(int(ppid)) == me:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def mask_cells() -> dict[int, list[str]]:
    "Cell counts the masker meets: SA after stage s grids crop / 2^(s+1); AttMask's ViT grids crop / 16."
    cells: dict[int, list[str]] = {}
    for crop in CROPS:
        for s in (1, 2, 3, 4):
            cells.setdefault((crop // 2 ** (s + 1)) ** 3, []).append(f'SA stage {s} @ {crop}')
        cells.setdefault((crop // 16) ** 3, []).append(f'vit-base @ {crop}')
    return dict(sorted(cells.items()))


def window_variants(quick: bool = False):
    head_dims = (12, 24) if quick else HEAD_DIMS
    dtypes = ('fp16', 'bf16') if quick else tuple(DTYPES)
    windows = {'4x4x4': WINDOWS['4x4x4'], '2x2x2 (clipped)': WINDOWS['2x2x2 (clipped)']} if quick else WINDOWS
    for target in TARGETS:
        for dtype in dtypes:
            for hd in head_dims:
                for wname, (window, shifts) in windows.items():
                    if wname.startswith('8x4x4') and (dtype == 'fp32' or hd > 24):
                        continue  # beyond the presets; enough to show why 'auto' stops at 64-token windows
                    for shifted in shifts:
                        for backward in (False, True):
                            yield dict(kernel='window_attention', target=target, dtype=dtype, head_dim=hd,
                                       window=wname, shifted=shifted, direction='backward' if backward else 'forward',
                                       _window=window)


def mask_variants(quick: bool = False):
    cells = mask_cells()
    for target in TARGETS:
        for n, where in cells.items():
            if quick and n != 512:
                continue
            for hints in (True, False):
                yield dict(kernel='topk_mask', target=target, cells=n, used_by=', '.join(where), hints=hints)


def _window_source(v):
    window, hd = v['_window'], v['head_dim']
    wn = window[0] * window[1] * window[2]
    cfg = wa.window_attention_config(wn, hd, v['dtype'], backward=v['direction'] == 'backward')
    meta = dict(C=4 * hd, HD=hd, WD=window[0], WH=window[1], WW=window[2], BLOCK_WN=cfg['block_wn'],
                BLOCK_HD=cfg['block_hd'], WPP=8, SHIFTED=v['shifted'], PREC='ieee' if v['dtype'] == 'fp32' else 'tf32',
                BACKWARD=v['direction'] == 'backward')
    ptr = DTYPES[v['dtype']]
    types = dict(qkv_ptr=ptr, out_ptr=ptr, bias_ptr=ptr, dout_ptr=ptr, dqkv_ptr=ptr, dbias_ptr='*fp32', scale='fp32')
    return wa._kernel, types, meta, cfg['num_warps'], wn


def _mask_source(v):
    cfg = tk.topk_mask_config(v['cells'])
    meta = dict(BLOCK_I=cfg['block_i'], BLOCK_J=cfg['block_j'], NEG=False, HINTS=v['hints'])
    types = dict(attn_ptr='*fp32', noise_ptr='*fp32', out_ptr='*i8')
    return tk._topk_mask_kernel, types, meta, cfg['num_warps']


def compile_variant(v: dict) -> dict:
    "Compile one variant for its target; registers and spill bytes from cuobjdump, shared bytes from the metadata."
    if v['kernel'] == 'window_attention':
        fn, types, meta, num_warps, wn = _window_source(v)
        auto = wa.fused_config_supported(wn, v['head_dim'], v['dtype'], TARGETS[v['target']])
    else:
        fn, types, meta, num_warps = _mask_source(v)
        auto = True  # the masker takes the kernel for any cell count on CUDA
    sig = {n: 'constexpr' if n in meta else types.get(n, 'i32') for n in fn.arg_names}
    attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith('*')}
    rec = {k: val for k, val in v.items() if not k.startswith('_')}
    rec.update(num_warps=num_warps, shared_limit=SHARED_LIMIT[v['target']], auto=auto)
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=meta, attrs=attrs),
                           target=GPUTarget('cuda', TARGETS[v['target']], 32), options={'num_warps': num_warps})
    except Exception as e:  # a variant that does not compile is a finding, not a crash of the report
        msg = str(e).splitlines()[0][:200] if str(e) else ''
        if 'ptxas' in f'{type(e).__name__} {e}'.lower() and ('-9' in str(e) or 'signal' in str(e).lower()):
            msg = f'ptxas stopped after {PTXAS_TIMEOUT} s (heavy spilling)'
        return {**rec, 'error': f'{type(e).__name__}: {msg}', 'fits': False}
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(k.asm['cubin'])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), '--dump-resource-usage', f.name], capture_output=True, text=True,
                               check=True).stdout
    m = re.search(r'REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)', usage)
    regs, stack, static_shared, local = map(int, m.groups())
    shared = max(int(k.metadata.shared), static_shared)
    rec.update(registers=regs, spill_bytes=stack + local, shared_bytes=shared,
               fits=stack + local == 0 and shared <= SHARED_LIMIT[v['target']])
    return rec


def markdown(records: list[dict], short: bool = False) -> str:
    """The window-attention table (one row per dtype, head dim and window; columns per target and direction) and the
    top-k mask table. `short`: only the shifted 4^3 windows (every preset's, and the most registers) and one mask row
    per distinct resource use."""
    if short:
        records = [r for r in records if r['kernel'] == 'topk_mask' or (r['window'] == '4x4x4' and r['shifted'])]
    out = ['| dtype | head dim | window | shifted | ' + ' | '.join(
        f'{t} {d}' for t in TARGETS for d in ('fwd', 'bwd')) + ' | auto |', '|---' * 9 + '|']
    rows: dict[tuple, dict] = {}
    for r in records:
        if r['kernel'] == 'window_attention':
            rows.setdefault((r['dtype'], r['head_dim'], r['window'], r['shifted']), {})[(r['target'], r['direction'])] = r

    def cell(r):
        if r is None:
            return ''
        if 'error' in r:
            return 'ptxas > 3 min' if 'stopped after' in r['error'] else 'does not compile'
        txt = f"{r['registers']} reg, {r['num_warps']} warps"
        if r['spill_bytes']:
            txt += f", **{r['spill_bytes']} B spill**"
        if r['shared_bytes'] > r['shared_limit']:
            txt += f", **{r['shared_bytes'] // 1024} KB shared > {r['shared_limit'] // 1024} KB**"
        elif r['shared_bytes'] >= 64 * 1024:
            txt += f", {r['shared_bytes'] // 1024} KB shared"
        return txt
    for (dtype, hd, window, shifted), rs in rows.items():
        cells = [cell(rs.get((t, d))) for t in TARGETS for d in ('forward', 'backward')]
        autos = {r['target']: r['auto'] for r in rs.values()}
        auto = 'yes' if all(autos.values()) else 'no' if not any(autos.values()) else \
            ', '.join(t for t, a in autos.items() if a) + ' only'
        out.append(f"| {dtype} | {hd} | {window} | {'yes' if shifted else 'no'} | " + ' | '.join(cells) + f' | {auto} |')
    out += ['', '| top-k mask cells | used by | hints | ' + ' | '.join(TARGETS) + ' |', '|---|---|---|---|---|']
    mrows: dict[tuple, dict] = {}
    for r in records:
        if r['kernel'] == 'topk_mask':
            mrows.setdefault((r['cells'], r['used_by'], r['hints']), {})[r['target']] = r
    groups: dict[tuple, list[int]] = {}  # short: cell counts that share their resource use
    for (n, used, hints), rs in mrows.items():
        cells = tuple(cell(rs.get(t)) for t in TARGETS)
        if short:
            groups.setdefault((hints, cells), []).append(n)
        else:
            out.append(f"| {n} | {used} | {'yes' if hints else 'no'} | " + ' | '.join(cells) + ' |')
    for (hints, cells), ns in groups.items():
        span = f'{min(ns)}' if len(ns) == 1 else f'{min(ns)} to {max(ns)}'
        out.append(f"| {span} | {len(ns)} cell count{'s' if len(ns) > 1 else ''} | {'yes' if hints else 'no'} | " + ' | '.join(cells) + ' |')
    return '\n'.join(out)


def problems(records: list[dict]) -> list[dict]:
    "Variants 'auto' may dispatch that spill, exceed the shared memory limit or do not compile."
    return [r for r in records if r['auto'] and ('error' in r or not r['fits'])]


def run(quick: bool = False, workers: int | None = None, progress: bool = True) -> list[dict]:
    variants = list(window_variants(quick)) + list(mask_variants(quick))
    threading.Thread(target=_ptxas_watchdog, args=(PTXAS_TIMEOUT,), daemon=True).start()
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        records = []
        for i, r in enumerate(pool.map(compile_variant, variants, chunksize=1)):
            records.append(r)
            if progress and (i + 1) % 25 == 0:
                print(f'{i + 1}/{len(variants)} variants compiled', file=sys.stderr, flush=True)
    return records


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--json', help='write one record per variant here')
    p.add_argument('--markdown', help='write the tables for BENCHMARKS.md here')
    p.add_argument('--short', action='store_true', help='tables of the shifted 4^3 windows only (BENCHMARKS.md)')
    p.add_argument('--quick', action='store_true', help="only the paper's configuration (swin-smit, 16-bit, 512 cells)")
    p.add_argument('--workers', type=int, default=None, help='compiler processes (default: one per CPU)')
    args = p.parse_args()
    records = run(args.quick, args.workers)
    meta = dict(triton=triton.__version__, targets=list(TARGETS), shared_limit=SHARED_LIMIT)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta, records=records), indent=1))
    table = markdown(records, args.short)
    if args.markdown:
        Path(args.markdown).write_text(table + '\n')
    else:
        print(table)
    bad = problems(records)
    print(f'{len(records)} variants on {", ".join(TARGETS)} (Triton {triton.__version__}); '
          f"{sum(r['auto'] for r in records)} that 'auto' may dispatch, of which {len(bad)} spill, exceed the "
          f'shared memory or do not compile', file=sys.stderr)
    for r in bad:
        print('  ', {k: r.get(k) for k in ('kernel', 'target', 'dtype', 'head_dim', 'window', 'direction', 'cells',
                                           'registers', 'spill_bytes', 'shared_bytes', 'error') if k in r},
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
