"""The paper's analyses on encoders pretrained by DAGMaN, SMIT and the two ablations, at a tiny scale (issue 15).

    python bench/bench_analysis.py --out runs/analysis                 # pretrain 4 methods, then dagman analyze
    python bench/bench_analysis.py --out runs/analysis --epochs 2      # a smoke run (minutes)

1. `dagman pretrain` on the three LIDC-IDRI CT volumes of `../shared/data/lidc_idri` with the paper's defaults (the
   command's CPU defaults: `swin-tiny`, 64^3 crops, heads 1024 / 512, batch 1 volume x 2 views, seed 0), once per
   method (`--methods`, default dagman, smit, sa-only, nt-only), with `--attn-stats-every` so the log carries the
   teacher's attention distance and entropy per stage; an encoder already in `OUT/METHOD/encoder.pth` is reused.
   A random `swin-tiny` (seed 0) is the untrained reference.
2. `dagman analyze` on all of them: organ crops (32^3 at 2 mm, `--n-per-organ` each) of the TotalSegmentator
   example CT and its label map (liver, spleen, kidneys, bladder, femurs, lungs: a CT and organs pretraining never
   saw), the head statistics on 8 crops, clustering, and the [CLS] attention over a centred 96^3 crop of that CT.
3. A Markdown table per stage (mean and standard deviation over heads of the attention distance and entropy) and
   of the clustering figures, printed and written to `OUT/table.md`.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dagman_fast.cli import main as dagman
from dagman_fast.checkpoint import save_encoder
from dagman_fast.swin import build_encoder

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'
ORGANS = {'liver': '5', 'spleen': '1', 'kidneys': '2,3', 'bladder': '21', 'femurs': '75,76', 'lungs': '10,11,12,13,14'}


def cpu_model() -> str:
    "The CPU's model name as lscpu gives it (timings depend on it), else what Python knows."
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pretrain(method: str, args, out: Path) -> float | None:
    "Pretrain with `method` unless its encoder is there; the seconds it took."
    if (out / method / 'encoder.pth').exists():
        print(f'{method}: reusing {out / method / "encoder.pth"}')
        return None
    t0 = time.time()
    status = dagman(['pretrain', '--data', str(args.lidc), '--method', method, '--epochs', str(args.epochs),
                     '--bs', '1', '--save-every', str(args.epochs), '--attn-stats-every', str(args.stats_every),
                     '--out', str(out / method)])
    if status:
        raise SystemExit(f'dagman pretrain --method {method} failed (exit {status})')
    return time.time() - t0


def table(summary: dict) -> str:
    encs = summary['encoders']
    stages = list(dict.fromkeys(s for e in encs.values() for s in e['per_stage']))
    lines = ['| encoder | ' + ' | '.join(stages) + ' |', '|---|' + '---|' * len(stages)]
    for what, mean, var, unit in (('distance', 'distance_mean', 'distance_var', 'voxels'),
                                  ('entropy', 'entropy_mean', 'entropy_var', 'nats')):
        for name, e in encs.items():
            cells = [f"{e['per_stage'][s][mean]:.2f} ± {e['per_stage'][s][var] ** 0.5:.2f}" if s in e['per_stage']
                     else '' for s in stages]
            lines.append(f'| {name}: {what} ({unit}) | ' + ' | '.join(cells) + ' |')
    lines += ['', '| encoder | inter | intra | inter / intra | silhouette | k-NN accuracy |',
              '|---|---|---|---|---|---|']
    for name, e in encs.items():
        c = e['clustering']
        lines.append(f"| {name} | {c['inter']:.2f} | {c['intra']:.2f} | {c['ratio']:.3f} | {c['silhouette']:.3f} | "
                     f"{c.get('knn_accuracy', float('nan')):.3f} |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs/analysis')
    p.add_argument('--methods', nargs='+', default=['dagman', 'smit', 'sa-only', 'nt-only'])
    p.add_argument('--epochs', type=int, default=40)
    p.add_argument('--stats-every', type=int, default=10)
    p.add_argument('--n-per-organ', type=int, default=16)
    p.add_argument('--lidc', default=str(SHARED / 'lidc_idri'))
    p.add_argument('--ct', default=str(SHARED / 'totalsegmentator' / 'example_ct.nii.gz'))
    p.add_argument('--seg', default=str(SHARED / 'totalsegmentator' / 'example_seg_fast_force_split.nii.gz'))
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch chooses)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    secs = {m: pretrain(m, args, out) for m in args.methods}
    random = out / 'random' / 'encoder.pth'
    if not random.exists():
        torch.manual_seed(0)
        enc = build_encoder('swin-tiny')
        save_encoder(enc, random)
    encoders = [str(out / m / 'encoder.pth') for m in args.methods] + [str(random)]
    status = dagman(['analyze', '--encoder', *encoders, '--names', *args.methods, 'random', '--data', args.ct,
                     '--label-map', args.seg, '--labels', *ORGANS.values(), '--label-names', *ORGANS,
                     '--n-per-organ', str(args.n_per_organ), '--out', str(out / 'analyze')])
    if status:
        raise SystemExit(f'dagman analyze failed (exit {status})')
    summary = json.loads((out / 'analyze' / 'summary.json').read_text())
    text = table(summary)
    (out / 'table.md').write_text(text + '\n')
    (out / 'timing.json').write_text(json.dumps(dict(pretrain_seconds=secs, cpu=cpu_model(),
                                                     torch=torch.__version__), indent=1) + '\n')
    print(text)


if __name__ == '__main__':
    main()
