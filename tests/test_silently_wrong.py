"""Nothing silently wrong (issue 26): inputs that would load and train without complaint but give a wrong result are
refused, naming the file and the reason, or handled (a label map on another grid, a damaged cache file). Each case is
a reproduction from the issue or one of the same kind; `--on-error skip` skips what it refuses."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_hardening import assert_one_line_error, run_cli

from dagman_fast.data import CTPreprocess, CTVolumes, cache_file_whole, ct_ssl_dls, file_stamp

TUTORIAL_DATA = Path(__file__).parents[1] / 'nbs' / 'tutorials' / 'data'  # a CT and its label map, as shipped
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _ct(shape=(24, 24, 24)) -> np.ndarray:
    "Air around a block of soft tissue, with noise: what a CT in HU looks like to the checks."
    rng = np.random.RandomState(0)
    hu = np.full(shape, -1000.0) + 20 * rng.standard_normal(shape)
    hu[4:-4, 4:-4, 4:-4] = 40 + 20 * rng.standard_normal(tuple(s - 8 for s in shape))
    return hu


def _nifti(path, data, affine=AFFINE, dtype=np.int16) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), str(path))
    return path


def _volumes(paths, tmp_path, on_error='raise', **kw):
    prep = CTPreprocess(crop=(16, 16, 16), **kw)
    return CTVolumes(paths, prep, cache_dir=tmp_path / 'cache', on_error=on_error, progress=False)


# ---------------------------------------------------------------- label maps, masks and values that are not HU


def test_show_batch_on_the_shipped_ct_and_label_map_refuses_the_label_map_and_skips_it_when_asked(tmp_path, capsys):
    rc, _, err = run_cli(capsys, 'show-batch', str(TUTORIAL_DATA), '--crop', '32', '--out', str(tmp_path / 'b.png'))
    assert rc == 1
    assert_one_line_error(err, 'example_seg_fast_force_split.nii.gz', 'not a CT in Hounsfield units',
                          'a label map or a mask')
    rc, printed, err = run_cli(capsys, 'show-batch', str(TUTORIAL_DATA), '--crop', '32', '--on-error', 'skip',
                               '--out', str(tmp_path / 'b.png'))
    assert rc == 0, err
    assert '1 scan(s) used, 1 skipped' in printed and 'example_seg_fast_force_split.nii.gz' in err


@pytest.mark.parametrize('name,values,reason', [
    ('mask.nii.gz', lambda hu: (hu > -500).astype(float), 'an integer map with 2 values (0, 1): a label map'),
    ('raw_no_intercept.nii.gz', lambda hu: hu + 1024, 'about 1024 above HU'),
    ('mr.nii.gz', lambda hu: (hu + 1000) * 0.8 + 3.5, 'no voxel below -500'),
])
def test_volumes_that_cannot_be_ct_are_refused_with_the_reason(tmp_path, name, values, reason):
    dtype = np.float32 if name == 'mr.nii.gz' else np.int16
    bad = _nifti(tmp_path / name, values(_ct()), dtype=dtype)
    with pytest.raises(ValueError, match=rf'{name}: cannot be used as a CT volume: not a CT in Hounsfield units'):
        _volumes([bad], tmp_path)
    try:
        _volumes([bad], tmp_path)
    except ValueError as e:
        assert reason in str(e)
    good = _nifti(tmp_path / 'ct.nii.gz', _ct())
    with pytest.warns(UserWarning, match=f'skipping .*{name}'):
        vols = _volumes([good, bad], tmp_path, on_error='skip')
    assert len(vols) == 1 and vols.skipped[0][0].endswith(name)


def _dicom_series(folder: Path, modality: str, n: int = 10) -> Path:
    "A small DICOM series (pydicom), `n` axial slices 2 mm apart."
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    folder.mkdir()
    series, hu = generate_uid(), _ct((n, 16, 16))
    for z in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.2'
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f'{z}.dcm'), {}, file_meta=meta, preamble=b'\0' * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series, generate_uid()
        ds.PatientID, ds.InstanceNumber = 'test', z + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.0 * z], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], 2.0
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = hu[z].astype(np.int16).tobytes()
        pydicom.dcmwrite(folder / f'{z}.dcm', ds, enforce_file_format=True)
    return folder


def test_a_dicom_series_that_is_not_ct_is_refused(tmp_path):
    with pytest.raises(ValueError, match='a DICOM series of modality MR, not CT'):
        _volumes([_dicom_series(tmp_path / 'mr', 'MR')], tmp_path)
    assert len(_volumes([_dicom_series(tmp_path / 'ct', 'CT')], tmp_path)) == 1  # the control: the same series as CT


# ---------------------------------------------------------------- voxel sizes that are unknown


def _raw_header_nifti(path, hu, pixdim=(3.0, 3.0, 3.0), srow=None, sform_code=1, qform_code=0) -> Path:
    "A NIfTI whose header fields are written as given (nibabel's image class would repair them)."
    h = nib.Nifti1Header()
    h.set_data_shape(hu.shape)
    h.set_data_dtype(np.int16)
    h['pixdim'][1:4] = pixdim
    s = np.diag([3.0, 3.0, 3.0, 1.0]) if srow is None else srow
    h['srow_x'], h['srow_y'], h['srow_z'] = s[0], s[1], s[2]
    h['sform_code'], h['qform_code'] = sform_code, qform_code
    h['vox_offset'] = 352
    # the bytes as they are: the header, 4 bytes of no extension, the voxels (Fortran order, as NIfTI stores them)
    raw = h.binaryblock + b'\0' * 4 + hu.astype(np.int16).tobytes(order='F')
    path.write_bytes(gzip.compress(raw) if path.name.endswith('.gz') else raw)
    return path


@pytest.mark.parametrize('case,words', [
    ('singular', 'sform) is singular'), ('nan', 'sform) is not finite'), ('zero_pixdim', 'pixdim 0x0x0 mm) is zero'),
])
def test_a_scan_whose_voxel_size_is_unknown_is_refused_not_read_as_1_mm(tmp_path, case, words):
    srow = np.diag([3.0, 3.0, 3.0, 1.0])
    if case == 'singular':
        srow[:, 2] = 0
    if case == 'nan':
        srow[0, 0] = np.nan
    path = _raw_header_nifti(tmp_path / f'{case}.nii.gz', _ct(), pixdim=0 if case == 'zero_pixdim' else 3.0,
                             srow=srow, sform_code=0 if case == 'zero_pixdim' else 1)
    with pytest.raises(ValueError, match=rf'{case}.nii.gz: cannot be used as a CT volume: .*{re.escape(words)}'):
        _volumes([path], tmp_path)
    ok = _raw_header_nifti(tmp_path / 'ok.nii.gz', _ct())  # the control: the same writer with a valid header
    assert len(_volumes([ok], tmp_path)) == 1


def test_a_numpy_file_has_no_voxel_size_and_is_refused(tmp_path):
    np.save(tmp_path / 'scan.npy', _ct().astype(np.int16))
    with pytest.raises(ValueError, match='scan.npy: .*a NumPy array has no voxel size'):
        _volumes([tmp_path / 'scan.npy'], tmp_path)


# ---------------------------------------------------------------- memory checked before it is allocated


def test_a_header_that_claims_more_voxels_than_the_file_holds_is_refused_before_allocation(tmp_path):
    "The issue's 1.4 KB NIfTI claiming 1100^3 voxels (2.6 GB of int16): refused from its header, nothing read."
    h = nib.Nifti1Header()
    h.set_data_shape((1100, 1100, 1100))
    h.set_data_dtype(np.int16)
    h['pixdim'][1:4] = 1.0
    raw = h.binaryblock + b'\0' * 4 + np.zeros(500, np.int16).tobytes()
    (tmp_path / 'liar.nii.gz').write_bytes(gzip.compress(raw))
    (tmp_path / 'liar.nii').write_bytes(raw)
    for name in ('liar.nii.gz', 'liar.nii'):
        with pytest.raises(ValueError, match=rf'{name}: .*header declares 1100x1100x1100 voxels of int16 '
                                             r'\(2,662,000,352 bytes with the header\) but the file holds 1,352 bytes'):
            _volumes([tmp_path / name], tmp_path)


def test_a_resampled_size_above_the_limit_is_refused_with_the_memory_it_would_take(tmp_path):
    "Voxels of 20 mm resampled to 0.5 mm: 1600^3 voxels; refused before MONAI's Spacing allocates them."
    hu = _ct((40, 40, 40))
    path = _nifti(tmp_path / 'coarse.nii.gz', hu, affine=np.diag([20.0, 20.0, 20.0, 1.0]))
    with pytest.raises(ValueError, match=r'coarse.nii.gz: .*resampled from 20x20x20 mm to 0.5x0.5x0.5 mm it would be '
                                         r'1600x1600x1600 voxels \(15.3 GiB as float32'):
        _volumes([path], tmp_path, spacing=(0.5, 0.5, 0.5))


@pytest.mark.parametrize('preset,size,table', [('swin-smit', 2048, '128 x 128 x 128 x 384'),
                                               ('vit-base', 2048, '128 x 128 x 128 x 768')])
def test_an_encoder_config_that_would_allocate_gigabytes_is_refused_before_building(tmp_path, capsys, preset, size,
                                                                                     table):
    "An encoder JSON with img_size 2048 (3.0 GiB of position embedding): refused by the config, named."
    from dagman_fast.encoder_configs import PRESETS
    cfg = PRESETS[preset].to_dict() | {'img_size': size}
    (tmp_path / 'enc.json').write_text(json.dumps(cfg))
    from dagman_fast.encoder_configs import encoder_config_from_dict
    with pytest.raises(ValueError, match=f'img_size {size}: the encoder would allocate a {table} table'):
        encoder_config_from_dict(cfg)


# ---------------------------------------------------------------- NaN created by a transform


def test_infinite_or_nan_intensities_from_the_intensity_scale_are_refused_naming_the_scan(tmp_path):
    "scl_slope 1e38: the int16 values overflow float32 to infinity (NaN once interpolated): named, never cached."
    img = nib.Nifti1Image(_ct().astype(np.int16), AFFINE)
    img.header.set_slope_inter(1e38, 0)
    nib.save(img, str(tmp_path / 'slope.nii.gz'))
    with pytest.raises(ValueError, match=r'slope.nii.gz: .*infinite voxels \(an intensity scale'):
        _volumes([tmp_path / 'slope.nii.gz'], tmp_path)
    assert not list((tmp_path / 'cache').rglob('*.pt'))


def test_the_check_after_resampling_names_the_scan():
    from monai.data import MetaTensor

    from dagman_fast.data import _CheckFinite
    x = MetaTensor(torch.zeros(1, 4, 4, 4), meta={'filename_or_obj': 'scan.nii.gz'})
    x[0, 1, 1, 1] = float('nan')
    with pytest.raises(ValueError, match='scan.nii.gz: NaN or infinite voxels after resampling to 2 mm'):
        _CheckFinite('image', 'after resampling to 2 mm')({'image': x})
    assert _CheckFinite('image', '')({'image': torch.zeros(1, 2, 2, 2)})['image'].shape == (1, 2, 2, 2)


# ---------------------------------------------------------------- the cache: fingerprints and damaged files


def test_a_scan_edited_to_the_same_size_with_its_mtime_restored_gets_a_new_stamp(tmp_path):
    import os

    from dagman_fast.data import _sampled_blocks

    def edit(path, offset):
        "One byte changed in place: the same size; then the modification time put back."
        st = path.stat()
        with open(path, 'r+b') as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    scan = _nifti(tmp_path / 'ct.nii.gz', _ct())  # under 1 MB: every byte is in the fingerprint
    before = file_stamp(scan)
    edit(scan, scan.stat().st_size // 2)
    assert file_stamp(scan) != before
    big = tmp_path / 'big.nii'  # 3 MB uncompressed: the sampled blocks
    big.write_bytes(np.random.default_rng(0).integers(0, 255, 3 * 2 ** 20, dtype=np.uint8).tobytes())
    blocks = _sampled_blocks(big.stat().st_size, dicom=False)
    assert len(blocks) == 18 and sum(n for _, n in blocks) == 2 * 2 ** 16 + 16 * 4096
    before = file_stamp(big)
    edit(big, blocks[7][0] + 100)  # inside an inner block
    assert file_stamp(big) != before
    before = file_stamp(big)
    edit(big, blocks[7][0] + 4096 + 100)  # between two blocks: what the README says is not covered
    assert file_stamp(big) == before


def test_a_truncated_cache_file_is_named_and_made_again_by_the_dataset_and_by_preprocess(tmp_path, capsys):
    from dagman_fast.preprocess import preprocess_scans
    (tmp_path / 'scans').mkdir()
    path = _nifti(tmp_path / 'scans' / 'ct.nii.gz', _ct())
    res = preprocess_scans(tmp_path / 'scans', tmp_path / 'cache', crop=16, progress=False)
    cached = next((tmp_path / 'cache' / res['key']).glob('*.pt'))
    whole = cached.read_bytes()
    assert cache_file_whole(cached)
    cached.write_bytes(whole[:len(whole) // 2])  # a copy cut short
    assert not cache_file_whole(cached)
    again = preprocess_scans(tmp_path / 'scans', tmp_path / 'cache', crop=16, progress=False)
    assert (again['ok'], again['computed']) == (1, 1)  # made again, not reported ok as it was
    assert cached.read_bytes() == whole
    cached.write_bytes(whole[:100])
    with pytest.warns(UserWarning, match=rf'ct.nii.gz: its cache file {cached}.* is damaged \(truncated\); made again'):
        dls = ct_ssl_dls(tmp_path / 'scans', crop=16, cache_dir=tmp_path / 'cache', progress=False)
    assert torch.equal(dls.volumes[0], torch.load(cached, weights_only=True)['image'])
    assert path.exists()


# ---------------------------------------------------------------- labels and input sizes of the classifiers


def _medmnist(root, train_labels, size=28, name='adrenalmnist3d'):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, y in (('train', np.asarray(train_labels)), ('val', np.arange(6) % 2), ('test', np.arange(8) % 2)):
        arrays[f'{split}_images'] = rng.integers(0, 255, (len(y), size, size, size), dtype=np.uint8)
        arrays[f'{split}_labels'] = y.reshape(-1, 1)
    np.savez(root / (f'{name}.npz' if size == 28 else f'{name}_{size}.npz'), **arrays)


@pytest.mark.parametrize('labels,index,value', [([0, 1] * 5 + [200, 0], 10, '200'), ([0, 1, -1, 0], 2, '-1'),
                                                ([0.0, 1.0, np.nan, 1.0], 2, 'nan'), ([0, 1, 0.5, 1], 2, '0.5')])
def test_a_stray_negative_nan_or_fractional_label_is_refused_naming_the_split_and_index(tmp_path, labels, index,
                                                                                         value):
    from dagman_fast.classify import medmnist3d_dls
    _medmnist(tmp_path, labels)
    with pytest.raises(ValueError, match=rf'adrenalmnist3d.npz: train_labels\[{index}\] is {value}: expected a class '
                                         r'0 to 1 \(adrenalmnist3d has 2 classes'):
        medmnist3d_dls('adrenalmnist3d', tmp_path)


@pytest.mark.slow
def test_evaluate_refuses_data_of_another_size_than_the_classifier_was_trained_on(tmp_path, capsys):
    _medmnist(tmp_path, [0, 1] * 6)
    _medmnist(tmp_path, [0, 1] * 6, size=64)
    out = tmp_path / 'cls'
    rc, _, err = run_cli(capsys, 'finetune', '--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--epochs', '1',
                         '--preset', 'swin-tiny', '--out', str(out))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, 'evaluate', str(out / 'classifier.pth'), '--medmnist', 'adrenalmnist3d', '--root',
                         str(tmp_path), '--size', '64', '--out', str(tmp_path / 'ev'))
    assert rc == 1
    assert_one_line_error(err, 'fine-tuned on 28^3 images; these are 64x64x64', '--size 28')
    rc, _, err = run_cli(capsys, 'evaluate', str(out / 'classifier.pth'), '--out', str(tmp_path / 'ev28'))
    assert rc == 0, err  # the control: its own size


def test_a_voxel_size_given_in_a_csv_is_used_for_files_without_a_valid_one(tmp_path):
    "The way to use a `.npy` or a scan with a broken header: a CSV with its voxel size; the volume is then to scale."
    hu = _ct((24, 24, 24))
    np.save(tmp_path / 'scan.npy', hu.astype(np.int16))
    srow = np.diag([3.0, 3.0, 3.0, 1.0])
    srow[:, 2] = 0
    _raw_header_nifti(tmp_path / 'singular.nii.gz', hu, srow=srow)
    ref = _nifti(tmp_path / 'ref.nii.gz', hu, affine=np.diag([3.0, 3.0, 3.0, 1.0]))  # the same voxels, 3 mm, valid
    (tmp_path / 'scans.csv').write_text('path,spacing\nscan.npy,3\nsingular.nii.gz,3 3 3\nref.nii.gz,\n')
    dls = ct_ssl_dls(tmp_path / 'scans.csv', crop=16, bs=1, cache_dir=tmp_path / 'cache', progress=False)
    assert len(dls.volumes) == 3 and not dls.skipped
    npy, singular, want = (dls.volumes[i] for i in range(3))
    assert min(want.shape[1:]) > 16  # the body (16 voxels of 3 mm) at 2 mm; at 1 mm it would be 8 voxels, padded to 16
    assert torch.equal(npy, want) and torch.equal(singular, want)  # at 3 mm, as the valid file: not 1 mm
    (tmp_path / 'bad.csv').write_text('path,spacing\nscan.npy,0\n')
    with pytest.raises(ValueError, match=r"bad.csv, line 2: spacing '0': expected one voxel size or three"):
        ct_ssl_dls(tmp_path / 'bad.csv', crop=16, bs=1, cache_dir=tmp_path / 'cache', progress=False)
