"""The `dagman` command (installed as a console script)."""
import subprocess
import sys

import nibabel as nib
import numpy as np

from dagman_fast.cli import main


def test_console_script_help():
    out = subprocess.run([sys.executable, '-m', 'dagman_fast.cli', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'show-batch' in out.stdout


def test_show_batch_writes_png_and_reports_skipped(tmp_path, capsys):
    hu = np.full((40, 40, 40), -1000.0, np.float32)
    hu[8:32, 8:32, 8:32] = 40.0
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / 'good.nii.gz'))
    (tmp_path / 'broken.nii.gz').write_bytes(b'not a scan')
    out = tmp_path / 'png' / 'batch.png'
    assert main(['show-batch', str(tmp_path), '--crop', '16', '--bs', '1', '--on-error', 'skip', '--out', str(out),
                 '--cache-dir', str(tmp_path / 'cache')]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    err = capsys.readouterr().err
    assert 'skipped' in err and 'broken.nii.gz' in err
