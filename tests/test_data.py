"""CT pipeline: real scans from ../shared/data, and bad files the tests make (each error must name the file)."""
import gzip
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dagman_fast.data import CTPreprocess, CTVolumes, ct_ssl_dls, find_ct_scans

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _nifti(path: Path, data, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _phantom(shape=(40, 40, 40), border=-1000.0) -> np.ndarray:
    "Air with a soft-tissue cube in the middle and an out-of-field rim of `border` HU."
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[10:30, 8:32, 12:28] = 40.0
    hu[:3], hu[-3:] = border, border
    return hu


def _dls(paths, tmp_path, **kw):
    kw = {'crop': 16, 'spacing': 2.0, 'bs': 1, 'cache_dir': tmp_path / 'cache', 'progress': False, **kw}
    return ct_ssl_dls(paths, **kw)


def test_views_shape_range_and_independence(tmp_path):
    dls = _dls([_nifti(tmp_path / 'a.nii.gz', _phantom()), _nifti(tmp_path / 'b.nii', _phantom())], tmp_path, bs=2,
               crop=(16, 12, 8))
    v1, v2 = dls.train.one_batch()
    assert v1.shape == v2.shape == (2, 1, 16, 12, 8) and v1.dtype == torch.float32
    assert 0 <= float(v1.min()) and float(v1.max()) <= 1
    assert not torch.equal(v1, v2)
    assert dls.n_inp == 2 and dls.skipped == []


def test_out_of_field_padding_is_air(tmp_path):
    "-3024 padding must come out exactly as air does, not as a darker 'tissue' the interpolation blends in."
    prep = CTPreprocess(spacing=(1.5, 1.5, 1.5), crop=(8, 8, 8))
    a = CTVolumes([_nifti(tmp_path / 'pad.nii.gz', _phantom(border=-3024.0))], prep, tmp_path / 'c1', progress=False)
    b = CTVolumes([_nifti(tmp_path / 'air.nii.gz', _phantom(border=-1000.0))], prep, tmp_path / 'c2', progress=False)
    torch.testing.assert_close(a[0], b[0])


def test_small_volume_is_padded(tmp_path):
    small = np.full((8, 8, 8), -1000.0, np.float32)
    small[2:6, 2:6, 2:6] = 40.0
    dls = _dls([_nifti(tmp_path / 'small.nii.gz', small)], tmp_path, crop=32)
    assert all(s >= 32 for s in dls.volumes[0].shape[1:])
    assert dls.train.one_batch()[0].shape == (1, 1, 32, 32, 32)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(tmp_path):
    good = _nifti(tmp_path / 'full.nii.gz', _phantom())
    data = good.read_bytes()
    bad = tmp_path / 'truncated.nii.gz'
    bad.write_bytes(data[: len(data) // 2])
    good.unlink()
    return bad


BAD_FILES = {
    'truncated': _truncated,
    'not an image': lambda p: _write(p / 'notes.nii.gz', gzip.compress(b'this is a text file')),
    '2-D image': lambda p: _nifti(p / 'slice.nii.gz', np.zeros((32, 32), np.float32) + np.arange(32)),
    '4-D series': lambda p: _nifti(p / 'series.nii.gz', np.stack([_phantom(), _phantom()], -1)),
    'constant': lambda p: _nifti(p / 'constant.nii.gz', np.full((16, 16, 16), 40.0, np.float32)),
    'NaN voxels': lambda p: _nifti(p / 'nan.nii.gz', np.where(_phantom() > 0, np.nan, _phantom())),
}
EXPECTED = {'truncated': 'cannot be used as a CT volume', 'not an image': 'cannot be used as a CT volume', '2-D image': '3-D volume', '4-D series': '4-D series',
            'constant': 'single value', 'NaN voxels': 'NaN'}


@pytest.mark.parametrize('kind', list(BAD_FILES))
def test_bad_file_raises_naming_it(tmp_path, kind):
    bad = BAD_FILES[kind](tmp_path)
    with pytest.raises(ValueError) as info:
        _dls([bad], tmp_path)
    assert bad.name in str(info.value) and EXPECTED[kind] in str(info.value)


@pytest.mark.parametrize('kind', list(BAD_FILES))
def test_bad_file_skipped_and_listed(tmp_path, kind):
    folder = tmp_path / 'scans'
    folder.mkdir()
    good = _nifti(folder / 'good.nii.gz', _phantom())
    bad = BAD_FILES[kind](folder)
    with pytest.warns(UserWarning, match=bad.name):
        dls = _dls(folder, tmp_path, on_error='skip')
    assert [Path(p).name for p, _ in dls.skipped] == [bad.name]
    assert dls.volumes.paths == [str(good)]
    assert dls.train.one_batch()[0].shape == (1, 1, 16, 16, 16)


def test_sources_and_bad_arguments(tmp_path):
    a = _nifti(tmp_path / 'a.nii.gz', _phantom())
    (tmp_path / 'list.csv').write_text('path,label\na.nii.gz,0\n')
    assert find_ct_scans(tmp_path / 'list.csv') == [tmp_path / 'a.nii.gz']
    (tmp_path / 'bad.csv').write_text('file\na.nii.gz\n')
    with pytest.raises(ValueError, match='`path` column'):
        find_ct_scans(tmp_path / 'bad.csv')
    with pytest.raises(FileNotFoundError, match='missing.nii.gz'):
        find_ct_scans([a, tmp_path / 'missing.nii.gz'])
    with pytest.raises(ValueError, match='on_error'):
        _dls([a], tmp_path, on_error='ignore')
    with pytest.raises(ValueError, match='hu_range'):
        _dls([a], tmp_path, hu_range=(250, -175))
    with pytest.raises(ValueError, match='valid_pct'):  # checked before any scan is read
        _dls([a], tmp_path, valid_pct=1.0)
    assert not (tmp_path / 'cache').exists(), 'bad arguments fail before the cache is touched'
    with pytest.raises(ValueError, match='spacing'):
        _dls([a], tmp_path, spacing=(2.0, 0.0, 2.0))


def test_changed_file_is_not_read_from_a_stale_cache(tmp_path):
    p = _nifti(tmp_path / 'a.nii.gz', _phantom())
    prep = CTPreprocess(spacing=(2.0, 2.0, 2.0), crop=(8, 8, 8))
    first = CTVolumes([p], prep, tmp_path / 'c', progress=False)[0].clone()
    _nifti(p, _phantom() + 100.0)  # same path, new content (and a new mtime/size stamp)
    second = CTVolumes([p], prep, tmp_path / 'c', progress=False)[0]
    assert not torch.equal(first, second)


def test_real_lidc_nifti_and_dicom(shared_data, tmp_path):
    "Real CT: the NIfTI scan and its 16 original DICOM slices, in one folder search, both preprocess and batch."
    lidc = shared_data / 'lidc_idri'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # MONAI's DICOM reader warns that an optional GPU decoder is missing
        dls = _dls([lidc / 'LIDC-IDRI-0002_ds2.nii.gz', lidc / 'LIDC-IDRI-0001' / 'dicom_slab'], tmp_path, crop=32,
                   bs=2)
    assert len(dls.volumes) == 2 and dls.skipped == []
    dicom = dls.volumes[1]
    # 16 slices of 2.5 mm resampled to 2 mm: 40 mm -> 20 voxels along z (then padded up to the crop)
    assert dicom.shape[0] == 1 and dicom.max() <= 1 and dicom.min() >= 0
    v1, v2 = dls.train.one_batch()
    assert v1.shape == (2, 1, 32, 32, 32)


def test_cache_holds_the_preprocessed_volume(tmp_path):
    "After the build, volumes come from the cache (the scan itself may be gone), stored loadable with weights_only."
    p = _nifti(tmp_path / 'a.nii.gz', _phantom())
    vols = CTVolumes([p], CTPreprocess(crop=(8, 8, 8)), tmp_path / 'c', progress=False)
    expected = vols[0].clone()
    p.unlink()
    torch.testing.assert_close(vols[0], expected)
    (cached,) = list((tmp_path / 'c').rglob('*.pt'))
    assert torch.equal(torch.load(cached, weights_only=True)['image'], expected)


def test_workers_draw_different_views(tmp_path):
    "With worker processes, views still differ between samples and workers (MONAI's RNG is reseeded per call)."
    paths = [_nifti(tmp_path / f'{i}.nii.gz', _phantom()) for i in range(4)]
    dls = _dls(paths, tmp_path, bs=1, num_workers=2)
    batches = [b for b in dls.train]
    crops = torch.cat([v1 for v1, _ in batches])
    assert len(batches) == 4 and len({c.sum().item() for c in crops}) > 1


def test_medmnist3d_official_splits(shared_data):
    from dagman_fast.classify import medmnist3d_dls
    for size in (28, 64):
        dls = medmnist3d_dls('adrenalmnist3d', shared_data / 'medmnist', size=size, bs=4)
        x, y = dls.valid.one_batch()
        assert x.shape == (4, 1, size, size, size) and 0 <= float(x.min()) and float(x.max()) <= 1
        assert y.dtype == torch.int64 and dls.c == 2
        assert [int(v) for v in dls.train.dataset.tensors[1].bincount()] == [929, 259]  # README's class counts
        assert [int(v) for v in dls.valid.dataset.tensors[1].bincount()] == [76, 22]
        assert [int(v) for v in dls.test.dataset.tensors[1].bincount()] == [229, 69]
    with pytest.raises(ValueError, match='size 28 or 64'):
        medmnist3d_dls('adrenalmnist3d', shared_data / 'medmnist', size=32)


def test_nodule_crops(shared_data):
    from dagman_fast.classify import nodule_crops_dls
    path = shared_data / 'lidc_idri' / 'lidc_idri_0001-0003_nodules.npz'
    dls = nodule_crops_dls(path, size=64, min_readers=1, label_rule='drop-indeterminate')
    n = len(dls.train.dataset) + len(dls.valid.dataset)
    assert n == 6 and len(dls.valid.dataset) == 2  # every nodule has a label 0/1; 34% held out
    x, y = dls.train.one_batch()
    assert x.shape[1:] == (1, 64, 64, 64) and set(y.tolist()) <= {0, 1}
    with np.load(path) as f:
        hu = f['images_64'].astype(np.float32)
    # the lung window maps -1000 HU to 0 and 400 HU to 1
    all_x = torch.cat([dls.train.dataset.tensors[0], dls.valid.dataset.tensors[0]])
    assert abs(float(all_x.mean()) - float(((np.clip(hu, -1000, 400) + 1000) / 1400).mean())) < 1e-5
    with pytest.raises(ValueError, match='sizes present'):
        nodule_crops_dls(path, size=48)


def test_compressed_dicom_series_equal_the_uncompressed_one(shared_data, tmp_path):
    "The 16 original LIDC slices re-encoded as RLE and as JPEG 2000 (lossless) preprocess to the same volume."
    import pydicom
    from pydicom.uid import JPEG2000Lossless, RLELossless
    slab = shared_data / 'lidc_idri' / 'LIDC-IDRI-0001' / 'dicom_slab'
    prep = CTPreprocess(crop=(16, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # MONAI's DICOM reader warns that an optional GPU decoder is missing
        ref = CTVolumes([slab], prep, tmp_path / 'c', progress=False)[0]
        for uid in (RLELossless, JPEG2000Lossless):
            out = tmp_path / uid.name.replace(' ', '_')
            out.mkdir()
            for f in sorted(slab.glob('*.dcm')):
                ds = pydicom.dcmread(f)
                ds.compress(uid)
                ds.save_as(out / f.name)
            assert pydicom.dcmread(next(out.glob('*.dcm'))).file_meta.TransferSyntaxUID == uid
            (found,) = find_ct_scans(out)
            torch.testing.assert_close(CTVolumes([found], prep, tmp_path / 'c', progress=False)[0], ref)


def test_views_as_subcrops_of_one_region(tmp_path):
    "SMIT's sampling: with view_region, both views come from one region, so they lie closer than independent crops."
    vol = torch.arange(64 ** 3, dtype=torch.float32).view(1, 64, 64, 64) / 64 ** 3  # position-coded volume
    from dagman_fast.data import TwoViews
    near = TwoViews([vol], 8, region=12, flip_prob=0, intensity=0)
    far = TwoViews([vol], 8, flip_prob=0, intensity=0)
    gap = lambda ds: sum(float((a.mean() - b.mean()).abs()) for a, b in (ds[0] for _ in range(50)))  # noqa: E731
    assert gap(near) < gap(far) / 3
    with pytest.raises(ValueError, match='at least the crop'):
        TwoViews([vol], 8, region=4)
    dls = _dls([_nifti(tmp_path / 'a.nii.gz', _phantom())], tmp_path, crop=16, view_region=24)
    assert all(s >= 24 for s in dls.volumes[0].shape[1:]) and dls.train.one_batch()[0].shape == (1, 1, 16, 16, 16)


def test_seg_pairs_select_and_remap_labels(tmp_path):
    "Label values are kept in the given order as classes 1..K, everything else is background; crops pair up."
    from dagman_fast.segment import seg_pairs_dls
    hu = _phantom()
    lab = np.zeros(hu.shape, np.uint8)
    lab[10:20, 8:32, 12:28] = 7  # the organ we want as class 1
    lab[20:30, 8:32, 12:28] = 3  # another organ we want as class 2
    lab[:, :, :4] = 9            # a label to drop
    img, seg = _nifti(tmp_path / 'ct.nii.gz', hu), _nifti(tmp_path / 'seg.nii.gz', lab)
    dls = seg_pairs_dls([(img, seg)], [7, 3], crop=16, spacing=2.0, bs=1, valid_pct=0, cache_dir=tmp_path / 'c',
                        progress=False)
    vol = dls.volumes[0]
    assert dls.c == 3 and {1.0, 2.0} <= set(vol['label'].unique().tolist()) <= {0.0, 1.0, 2.0}  # 9 dropped
    assert int((vol['label'] == 1).sum()) == int((lab == 7).sum())  # same grid (2 mm), nearest: voxel counts kept
    x, y = dls.train.one_batch()
    assert x.shape == (1, 1, 16, 16, 16) and y.shape == (1, 16, 16, 16) and y.dtype == torch.int64
    from dagman_fast.data import PrefetchDataLoader  # a batch ahead on a GPU; the one-ahead loop gives the same pairs
    assert isinstance(dls.train, PrefetchDataLoader) and isinstance(dls.valid, PrefetchDataLoader)
    dls.train.prefetch = True
    x2, y2 = next(iter(dls.train))
    assert x2.shape == x.shape and y2.shape == y.shape and y2.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match='missing'):
        seg_pairs_dls([(img, tmp_path / 'missing.nii.gz')], [7], cache_dir=tmp_path / 'c', progress=False)
    with pytest.raises(ValueError, match='label_values'):
        seg_pairs_dls([(img, seg)], [], cache_dir=tmp_path / 'c', progress=False)


@pytest.mark.parametrize('hu,what', [(-600.0, 'all air'), (900.0, 'all bone')])
def test_volume_outside_the_hu_window_is_refused(tmp_path, hu, what):
    "A volume the window flattens (not a CT in HU, or all air) must not come out as a blank or saturated tensor."
    vol = np.full((24, 24, 24), hu, np.float32) + np.random.RandomState(0).rand(24, 24, 24).astype(np.float32)
    bad = _nifti(tmp_path / f'{what.replace(" ", "_")}.nii.gz', vol)
    with pytest.raises(ValueError, match='Hounsfield units'):  # the window's check, or the CT check before it
        _dls([bad], tmp_path)


def test_folder_with_two_dicom_series_is_refused(shared_data, tmp_path):
    import pydicom
    folder = tmp_path / 'mixed'
    folder.mkdir()
    for i, f in enumerate(sorted((shared_data / 'lidc_idri' / 'LIDC-IDRI-0001' / 'dicom_slab').glob('*.dcm'))):
        ds = pydicom.dcmread(f)
        if i % 2:
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + '.2'
        ds.save_as(folder / f.name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='2 DICOM series'):
            _dls([folder], tmp_path)


def test_seg_cache_is_keyed_by_the_kept_labels_and_grids_must_match(tmp_path):
    from dagman_fast.segment import seg_pairs_dls
    hu = _phantom()
    lab = np.zeros(hu.shape, np.uint8)
    lab[10:20, 8:32, 12:28], lab[20:30, 8:32, 12:28] = 1, 5
    img, seg = _nifti(tmp_path / 'ct.nii.gz', hu), _nifti(tmp_path / 'seg.nii.gz', lab)
    kw = dict(crop=16, spacing=2.0, bs=1, valid_pct=0, cache_dir=tmp_path / 'c', progress=False)
    ones = int((seg_pairs_dls([(img, seg)], [1], **kw).volumes[0]['label'] == 1).sum())
    fives = int((seg_pairs_dls([(img, seg)], [5], **kw).volumes[0]['label'] == 1).sum())
    assert (ones, fives) == (int((lab == 1).sum()), int((lab == 5).sum()))
    far = AFFINE.copy()
    far[:3, 3] += 500.0  # the same grid, 500 mm away along each axis: the label map of another scan
    other = _nifti(tmp_path / 'seg_elsewhere.nii.gz', lab, affine=far)
    with pytest.raises(ValueError, match=r'does not overlap its image \(their centres are 866 mm apart'):
        seg_pairs_dls([(img, other)], [1], **kw)


def test_a_label_map_in_another_axis_order_or_grid_is_put_on_the_image_grid(tmp_path):
    "As tools that write NIfTI from a DICOM series do: the same label map, axes swapped and flipped, or at 1 mm."
    from dagman_fast.segment import seg_pairs_dls
    hu = _phantom()
    lab = np.zeros(hu.shape, np.uint8)
    lab[10:20, 8:32, 12:28], lab[20:30, 8:24, 12:20] = 1, 2  # asymmetric: a wrong flip would show
    img = _nifti(tmp_path / 'ct.nii.gz', hu)
    kw = dict(crop=16, spacing=2.0, bs=1, valid_pct=0, progress=False)
    want = seg_pairs_dls([(img, _nifti(tmp_path / 'seg.nii.gz', lab))], [1, 2], cache_dir=tmp_path / 'c0',
                         **kw).volumes[0]['label']
    # axes (z, y, x) and the first flipped: voxel (i, j, k) of the new array is voxel (n-1-k, j, i) of the old one
    swapped = np.flip(lab, 0).transpose(2, 1, 0).copy()
    to_old = np.zeros((4, 4))
    to_old[0, 2], to_old[1, 1], to_old[2, 0], to_old[0, 3], to_old[3, 3] = -1, 1, 1, lab.shape[0] - 1, 1
    got = seg_pairs_dls([(img, _nifti(tmp_path / 'seg_zyx.nii.gz', swapped, affine=AFFINE @ to_old))], [1, 2],
                        cache_dir=tmp_path / 'c1', **kw).volumes[0]['label']
    assert torch.equal(got, want)
    # on a 1 mm grid over the same space (each voxel doubled): nearest neighbour gives the 2 mm map back
    fine = lab.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    half = AFFINE @ np.diag([0.5, 0.5, 0.5, 1.0])
    half[:3, 3] = AFFINE[:3, 3] - 0.25 * np.diag(AFFINE)[:3]  # voxel centres: two fine ones around each coarse one
    got = seg_pairs_dls([(img, _nifti(tmp_path / 'seg_1mm.nii.gz', fine, affine=half))], [1, 2],
                        cache_dir=tmp_path / 'c2', **kw).volumes[0]['label']
    assert (got != want).float().mean() < 0.02  # the borders may move by a voxel where centres tie


def test_batches_reproducible_with_set_seed(tmp_path):
    from fastai.torch_core import set_seed
    dls = _dls([_nifti(tmp_path / f'{i}.nii.gz', _phantom()) for i in range(5)], tmp_path, bs=2)
    runs = []
    for _ in range(2):
        set_seed(3)
        runs.append(torch.cat([v1 for v1, _ in dls.train]))
    torch.testing.assert_close(runs[0], runs[1])


def test_orientation_and_spacing_are_normalised(tmp_path):
    "The same anatomy stored RAS at 2 mm and LPS-flipped at 1 mm preprocesses to the same RAS volume at 2 mm."
    hu = np.full((40, 40, 40), -1000.0, np.float32)
    hu[6:30, 10:34, 14:26] = 40.0       # an off-centre, asymmetric block
    hu[6:12, 10:16, 14:18] = 200.0      # a marker in one corner
    ras = _nifti(tmp_path / 'ras.nii.gz', hu)
    # LPS storage: flip the first two axes and say so in the affine; 1 mm voxels (each 2 mm voxel twice per axis).
    lps_data = np.repeat(np.repeat(np.repeat(hu[::-1, ::-1], 2, 0), 2, 1), 2, 2)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [79.5, 79.5, -0.5]  # voxel centres line up with the 2 mm grid's
    lps = _nifti(tmp_path / 'lps.nii.gz', lps_data, affine)
    assert nib.aff2axcodes(affine) == ('L', 'P', 'S')
    prep = CTPreprocess(spacing=(2.0, 2.0, 2.0), crop=(8, 8, 8))
    a = CTVolumes([ras], prep, tmp_path / 'c', progress=False)[0]
    b = CTVolumes([lps], prep, tmp_path / 'c', progress=False)[0]
    assert a.shape == b.shape
    marker = lambda v: np.unravel_index(int(v[0].argmax()), v.shape[1:])  # noqa: E731
    assert marker(a) == marker(b)
    assert float((a - b).abs().mean()) < 0.05


def _nodule_file(path, medians, readers=None, labels=True, size=8):
    "A nodule file in the shared layout with other counts: `len(medians)` nodules of `size`^3."
    n = len(medians)
    rs = np.random.RandomState(0)
    arrays = {f'images_{size}': rs.randint(-1000, 400, (n, size, size, size)).astype(np.int16),
              'n_readers': np.asarray(readers if readers is not None else [4] * n)}
    if medians is not None:
        arrays['malignancy_median'] = np.asarray(medians, np.float32)
    if labels:  # the file's own rule: below 3 benign, above malignant, 3 indeterminate (-1)
        m = np.asarray(medians, np.float32)
        arrays['labels'] = np.where(m < 3, 0, np.where(m > 3, 1, -1)).astype(np.int8)
    np.savez(path, **arrays)
    return path


def test_nodule_label_rules(tmp_path):
    from dagman_fast.classify import nodule_crops_dls, nodule_labels
    medians = [1, 2, 2.5, 3, 3, 3.5, 4, 4.5, 5, 3]
    assert nodule_labels(medians, 'paper').tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert nodule_labels(medians, 'drop-indeterminate').tolist() == [0, 0, 0, -1, -1, 1, 1, 1, 1, -1]
    path = _nodule_file(tmp_path / 'n.npz', medians)

    def everything(dls):
        return torch.cat([torch.cat([y for _, y in dl]) for dl in (dls.train, dls.valid)])

    paper = nodule_crops_dls(path, size=8, bs=3)  # the default is the paper's grouping: every nodule kept
    y = everything(paper)
    assert len(y) == 10 and sorted(y.tolist()) == [0] * 6 + [1] * 4 and paper.counts == {0: 6, 1: 4}
    assert paper.c == 2 and paper.label_rule == 'paper'
    drop = nodule_crops_dls(path, size=8, bs=3, label_rule='drop-indeterminate')
    y = everything(drop)
    assert len(y) == 7 and int(y.min()) >= 0 and drop.counts == {0: 3, 1: 4}
    # readers and rules together; a label of -1 never reaches a batch
    few = nodule_crops_dls(path, size=8, label_rule='drop-indeterminate', min_readers=1)
    assert int(everything(few).min()) >= 0
    with pytest.raises(ValueError, match="Did you mean 'paper'"):
        nodule_crops_dls(path, size=8, label_rule='papr')


def test_nodule_files_without_medians_or_with_bad_ratings(tmp_path):
    from dagman_fast.classify import nodule_crops_dls
    path = _nodule_file(tmp_path / 'old.npz', [1, 3, 5, 2], labels=True)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f if k != 'malignancy_median'}
    np.savez(path, **arrays)  # an older file: labels only
    with pytest.raises(ValueError, match='malignancy_median'):
        nodule_crops_dls(path, size=8)
    dls = nodule_crops_dls(path, size=8, label_rule='drop-indeterminate')
    assert dls.counts == {0: 2, 1: 1}
    bad = _nodule_file(tmp_path / 'bad.npz', [1, 0, 5], labels=False)
    with pytest.raises(ValueError, match='1..5'):
        nodule_crops_dls(bad, size=8)


def test_crops_per_scan_lists_each_training_scan_that_often(tmp_path):
    "Each training scan k times per epoch (new crops each time), validation scans once; a bad count names the argument."
    paths = [_nifti(tmp_path / f'{i}.nii.gz', _phantom()) for i in range(4)]
    dls = _dls(paths, tmp_path, bs=2, crops_per_scan=3, valid_pct=0.25, seed=0)
    assert len(dls.train.dataset) == 3 * 3 and len(dls.valid.dataset) == 1
    v1, v2 = dls.train.one_batch()
    assert v1.shape == (2, 1, 16, 16, 16)
    assert len(_dls(paths, tmp_path, crops_per_scan=1).train.dataset) == 4
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match='crops_per_scan must be an integer >= 1'):
            _dls(paths, tmp_path, crops_per_scan=bad)


def test_demo_scans_are_real_chest_ct_at_2mm(tmp_path):
    "The two shipped CTs: 2 mm voxels, HU kept in the library's window with air at -1000, licence beside them."
    from dagman_fast.data import demo_ct_scans
    paths = demo_ct_scans()
    assert [p.name for p in paths] == ['LIDC-IDRI-0001_2mm.nii.gz', 'LIDC-IDRI-0002_2mm.nii.gz']
    assert 'CC BY 3.0' in (paths[0].parent / 'README.md').read_text()
    for p in paths:
        img = nib.load(p)
        hu = np.asarray(img.dataobj)
        assert np.allclose(img.header.get_zooms(), 2.0) and hu.dtype == np.int16 and hu.shape[2] == 112
        assert hu.min() == -1000 and hu.max() == 250 and not ((hu > -1000) & (hu < -175)).any()
        assert 0.2 < float((hu > -175).mean()) < 0.8  # a body, not a blank
        assert sum(p.stat().st_size for p in paths) < 4e6
    dls = _dls(paths, tmp_path, crop=32, bs=2)
    assert len(dls.volumes) == 2 and all(v.shape[-1] == 112 and min(v.shape[1:3]) > 128 for v in dls.volumes)  # 2 mm


def test_views_augmented_on_the_device_match_the_host_distribution():
    """`augment='device'`: the dataset gives plain crops; `batch_augment` flips each volume of the batch per axis with
    `flip_prob`, then scales by 1 + U(-i, i) and shifts by U(-i, i), each with probability 0.5, clipped to [0, 1]."""
    import itertools

    from dagman_fast.data import TwoViews
    vol = 0.25 + 0.5 * torch.rand(1, 12, 12, 12)  # inside [0, 1] with room for the jitter: no clipping
    plain = TwoViews([vol], 12, augment='device')
    assert type(plain.tf.transforms[-1]).__name__ == 'RandSpatialCrop'  # no flips or jitter on the host
    assert all(torch.equal(v, vol) for v in plain[0])  # the crop of a volume its size: the volume, unchanged
    flipped = {fl: vol.flip([1 + a for a in range(3) if fl[a]]) for fl in itertools.product((0, 1), repeat=3)}
    torch.manual_seed(0)
    y = plain.batch_augment(vol.expand(400, 1, 12, 12, 12).contiguous())
    flips, scaled, shifted = torch.zeros(3), 0, 0
    for out in y:
        # each output is one of the 8 flips under an intensity map a * v + b: find it by least squares
        fits = []
        for fl, c in flipped.items():
            a = float(((out - out.mean()) * (c - c.mean())).sum() / ((c - c.mean()) ** 2).sum())
            b = float(out.mean() - a * c.mean())
            fits.append((float((out - (a * c + b)).abs().max()), fl, a, b))
        err, fl, a, b = min(fits)
        assert err < 1e-5 and 0.9 - 1e-6 <= a <= 1.1 + 1e-6 and abs(b) <= 0.1 + 1e-6
        flips += torch.tensor(fl, dtype=torch.float32)
        scaled, shifted = scaled + (abs(a - 1) > 1e-6), shifted + (abs(b) > 1e-6)
    assert all(150 < f < 250 for f in flips.tolist()), flips  # each axis flipped about half the time
    assert 150 < scaled < 250 and 150 < shifted < 250, (scaled, shifted)
    assert float(plain.batch_augment(torch.ones(8, 1, 4, 4, 4)).max()) <= 1  # clipped
    v1, v2 = plain.batch_augment((y[:8], y[:8]))  # a tuple of views: each view its own draws
    assert not torch.equal(v1, v2)


def test_ssl_loaders_augment_on_the_device_per_view(tmp_path):
    "`augment_on='device'`: fastai's `after_batch` augments each view with its own draws; bad values are refused."
    paths = [_nifti(tmp_path / 'a.nii.gz', _phantom())]
    host = _dls(paths, tmp_path, bs=1)
    assert host.train.dataset.augment == 'host'  # on the CPU 'auto' keeps MONAI's per-view transforms
    dev = _dls(paths, tmp_path, bs=1, augment_on='device', flip_prob=1.0, intensity=0.0)
    assert dev.train.dataset.augment == dev.valid.dataset.augment == 'device'
    torch.manual_seed(0)
    raw = dev.train.dataset[0]  # what the host made: plain crops
    torch.manual_seed(0)
    v1, v2 = dev.train.one_batch()
    # flip_prob 1 flips all three axes of each view, on the device side
    torch.testing.assert_close(v1[0], raw[0].flip([1, 2, 3]).clamp(0, 1))
    torch.testing.assert_close(v2[0], raw[1].flip([1, 2, 3]).clamp(0, 1))
    with pytest.raises(ValueError, match='augment_on'):
        _dls(paths, tmp_path, augment_on='gpu')
