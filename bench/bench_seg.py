"""Segmentation evidence on the labelled real CT in ../shared/data, through the `dagman` command line.

    python bench/bench_seg.py                        # both tasks, random and DAGMaN-pretrained encoders (~15 min on 2 CPU cores)
    python bench/bench_seg.py --out runs/seg --tasks organs --arms scratch

Tasks (tiny: one abdomen and six nodules; the Dice says the pipeline learns, not how well it generalises):

- `organs`: the TotalSegmentator example CT (3 mm, labels from TotalSegmentator's own model) cut at the midline.
  The model trains on the patient's left half and is scored on the right half, which it never sees: left/right
  organs merged into classes (kidney 2+3, femur 75+76, iliopsoas 88+89), random flips in training.
- `nodules`: the LIDC-IDRI nodule crops (64^3, 1 mm, consensus masks of the radiologists), split by patient:
  trains on the 5 nodules of patients 0002 and 0003, scored on the nodule of patient 0001 (solid, 4 readers).

Arms: `scratch` (a random `swin-tiny`) and `dagman` (`swin-tiny` pretrained by `dagman pretrain` on the CT volumes
that hold no validation voxel of either task: LIDC-IDRI 0002 and the left half of the abdomen; the scan of 0001,
whose nodule is held out, is not used). Every volume is written to
`--out` (never into ../shared/data); each run leaves `results.json`, `segmenter.pth` and overlay PNGs there, and a
table (whole-volume Dice per class on the held-out volumes) is printed and saved as `table.md`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from dagman_fast.cli import main as dagman

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'
ORGANS = dict(labels=['2,3', '75,76', '88,89'], names=['kidney', 'femur', 'iliopsoas'])


def organ_halves(out: Path) -> tuple[list, list]:
    "The abdomen cut at the midline of its first (R) axis: left half to train, right half to validate."
    ts = SHARED / 'totalsegmentator'
    ct, seg = nib.load(ts / 'example_ct.nii.gz'), nib.load(ts / 'example_seg_fast_force_split.nii.gz')
    if nib.aff2axcodes(ct.affine)[0] != 'R':
        raise ValueError(f'expected a RAS volume; got {nib.aff2axcodes(ct.affine)}')
    mid = ct.shape[0] // 2
    paths = {}
    for half, sl in (('left', slice(0, mid)), ('right', slice(mid, None))):  # R axis: low index = patient's left
        for name, img in (('ct', ct), ('seg', seg)):
            p = out / f'abdomen_{half}_{name}.nii.gz'
            nib.save(img.slicer[sl], p)  # nibabel's slicer keeps the affine of the cut
            paths[half, name] = str(p)
    return [(paths['left', 'ct'], paths['left', 'seg'])], [(paths['right', 'ct'], paths['right', 'seg'])]


# The crops are (z up, DICOM row, DICOM column) = (S, P, L) in LPS terms: as RAS+, (i, j, k) -> (-k, -j, i) mm.
NODULE_AFFINE = np.array([[0, 0, -1, 0], [0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def nodule_volumes(out: Path) -> tuple[list, list]:
    "The 64^3 nodule crops and consensus masks as 1 mm NIfTI pairs; 0002 and 0003 train, 0001 validates."
    with np.load(SHARED / 'lidc_idri' / 'lidc_idri_0001-0003_nodules.npz') as f:
        images, masks, patients = f['images_64'], f['masks_64'], f['patient_id']
    train, valid = [], []
    for i, (img, mask, pid) in enumerate(zip(images, masks, patients)):
        pair = []
        for name, arr in (('ct', img.astype(np.int16)), ('mask', mask.astype(np.uint8))):
            p = out / f'nodule{i}_{str(pid)[-4:]}_{name}.nii.gz'
            nib.save(nib.Nifti1Image(arr, NODULE_AFFINE), p)  # 1 mm isotropic; image and mask share the grid
            pair.append(str(p))
        (valid if str(pid).endswith('0001') else train).append(tuple(pair))
    return train, valid


def pretrain(out: Path, train_halves: list, args) -> Path:
    enc = out / 'pretrain' / 'encoder.pth'
    if enc.exists():
        return enc
    data = [str(SHARED / 'lidc_idri' / 'LIDC-IDRI-0002_ds2.nii.gz'), train_halves[0][0]]  # no held-out voxel
    short = ['cross_view=False', 'ema_momentum=0.99', 'teacher_temp_warmup=10', 'encoder.drop_path_rate=0']
    rc = dagman(['pretrain', '--data', *data, '--preset', 'swin-tiny', '--crop', '64', '--bs', '2',
                 '--epochs', str(args.pretrain_epochs), '--save-every', '25', '--out', str(out / 'pretrain'),
                 *[a for s in short for a in ('--set', s)]])
    if rc:
        raise SystemExit(f'dagman pretrain failed ({rc})')
    return enc


def finetune(task: str, arm: str, train: list, valid: list, encoder: Path | None, out: Path, args) -> dict:
    run = out / f'{task}_{arm}'
    if not (run / 'results.json').exists():
        if task == 'organs':
            data = ['--labels', *ORGANS['labels'], '--label-names', *ORGANS['names'], '--spacing', '3',
                    '--samples-per-volume', '8', '--epochs', str(args.organ_epochs)]
        else:
            data = ['--labels', '1', '--label-names', 'nodule', '--spacing', '1', '--hu-range', '-1000', '400',
                    '--samples-per-volume', '2', '--epochs', str(args.nodule_epochs)]
        pairs = [a for p in train for a in ('--seg', *p)] + [a for p in valid for a in ('--valid-seg', *p)]
        enc = ['--encoder', str(encoder)] if encoder else ['--preset', 'swin-tiny']
        rc = dagman(['finetune', *pairs, *data, *enc, '--crop', '64', '--bs', '2', '--freeze-epochs', '2',
                     '--lr', str(args.lr), '--seed', '0', '--out', str(run)])
        if rc:
            raise SystemExit(f'dagman finetune failed ({rc})')
    return json.loads((run / 'results.json').read_text())['valid']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=None, help='output folder (default: a new temporary folder); reruns reuse it')
    p.add_argument('--tasks', nargs='+', default=['organs', 'nodules'], choices=['organs', 'nodules'])
    p.add_argument('--arms', nargs='+', default=['scratch', 'dagman'], choices=['scratch', 'dagman'])
    p.add_argument('--pretrain-epochs', type=int, default=80, help='one step of 2 volumes per epoch')
    p.add_argument('--organ-epochs', type=int, default=10, help='after 2 frozen ones (pretrained); 4 steps each')
    p.add_argument('--nodule-epochs', type=int, default=8, help='after 2 frozen ones (pretrained); 5 steps each')
    p.add_argument('--lr', type=float, default=1e-3)
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix='bench_seg_'))
    (out / 'data').mkdir(parents=True, exist_ok=True)
    splits = {'organs': organ_halves(out / 'data'), 'nodules': nodule_volumes(out / 'data')}
    encoder = pretrain(out, splits['organs'][0], args) if 'dagman' in args.arms else None
    lines = ['| task | encoder | held-out volumes | Dice per class (mean over volumes) | mean Dice |', '|---|---|---|---|---|']
    for task in args.tasks:
        for arm in args.arms:
            res = finetune(task, arm, *splits[task], encoder if arm == 'dagman' else None, out, args)
            per = ', '.join(f'{k} {v:.3f}' if v is not None else f'{k} n/a' for k, v in res['dice'].items())
            mean = 'n/a' if res['mean_dice'] is None else f"{res['mean_dice']:.3f}"
            lines.append(f"| {task} | {arm} | {len(res['volumes'])} | {per} | {mean} |")
            print(lines[-1], flush=True)
    (out / 'table.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    print(f'runs, overlays and table in {out}')


if __name__ == '__main__':
    main()
