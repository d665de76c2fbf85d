"""Derive the two small chest CTs the package ships (`dagman_fast/demo_data/`) from `../shared/data/lidc_idri`.

    python bench/make_demo_data.py            # rewrites dagman_fast/demo_data/LIDC-IDRI-000{1,2}_2mm.nii.gz

Each scan of LIDC-IDRI (TCIA, CC BY 3.0) is put in RAS orientation and resampled to 2 mm (MONAI, bilinear), cropped to
the body's bounding box (HU > -500) and to its central 112 slices (224 mm), and kept in the library's HU window: values
below -175 HU become -1000 (air, black in any viewer) and values above 250 HU become 250. Pretraining maps that window
to [0, 1] anyway (`hu_range=(-175, 250)`), so for the library nothing is lost; the two files take about 3.3 MB instead
of 10 MB. They are for the demo and the tests, not for measuring anything.
"""
from pathlib import Path

import nibabel as nib
import numpy as np
from monai import transforms as T

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'lidc_idri'
OUT = Path(__file__).resolve().parents[1] / 'dagman_fast' / 'demo_data'
SLICES = 112


def derive(src: Path, dst: Path):
    load = T.Compose([T.LoadImaged('img', ensure_channel_first=True), T.Orientationd('img', 'RAS', labels=None),
                      T.Spacingd('img', (2.0, 2.0, 2.0), mode='bilinear')])
    img = load({'img': str(src)})['img']
    hu, affine = img[0].numpy(), img.affine.numpy()
    box = [np.flatnonzero((hu > -500).any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = [int(b[0]) for b in box]
    hi = [int(b[-1]) + 1 for b in box]
    mid = (lo[2] + hi[2]) // 2  # the central slices of the body
    lo[2], hi[2] = max(lo[2], mid - SLICES // 2), min(hi[2], mid - SLICES // 2 + SLICES)
    hu = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine[:3, 3] = (affine @ np.array([*lo, 1.0]))[:3]  # the crop's first voxel
    hu = np.where(hu < -175, -1000, np.clip(np.round(hu), -175, 250)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, affine), dst)
    print(f'{dst.name}: {hu.shape} voxels of 2 mm, {dst.stat().st_size / 1e6:.2f} MB')


if __name__ == '__main__':
    OUT.mkdir(exist_ok=True)
    for name in ('LIDC-IDRI-0001', 'LIDC-IDRI-0002_ds2'):
        derive(SHARED / f'{name}.nii.gz', OUT / f'{name[:14]}_2mm.nii.gz')
