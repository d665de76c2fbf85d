"""The paper's kernel variants compile for the A100 (sm_80) and the H100/H200 (sm_90) without spilling registers
and within the shared memory a program may use, checked on the CPU: Triton compiles for a GPU it does not see,
and the `cuobjdump` in its wheel reads the cubin (`bench/kernel_resources.py`).

It belongs to the Triton job of the README's test command (`TRITON_INTERPRET=1 pytest tests/test_triton.py
tests/test_kernel_resources.py`) and skips elsewhere, so that it runs once per CI run. The compiler itself runs in a
subprocess without `TRITON_INTERPRET` (under the interpreter `@triton.jit` gives functions that do not compile).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get('TRITON_INTERPRET') != '1':
    pytest.skip('the Triton job runs this: TRITON_INTERPRET=1 pytest tests/test_kernel_resources.py',
                allow_module_level=True)
pytest.importorskip('triton')
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'bench' / 'kernel_resources.py'


def _run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=ROOT / 'bench',
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def quick():
    "The report's quick set: swin-smit's head dims 12 and 24, fp16 and bf16, both directions and targets, the mask."
    return _run('import json, kernel_resources as kr; print(json.dumps(kr.run(quick=True, progress=False)))')


def test_paper_configuration_has_no_spills_and_fits_shared_memory(quick):
    wa = [r for r in quick if r['kernel'] == 'window_attention']
    seen = {(r['target'], r['dtype'], r['head_dim'], r['direction']) for r in wa}
    assert seen == {(t, d, hd, dr) for t in ('sm_80', 'sm_90') for d in ('fp16', 'bf16') for hd in (12, 24)
                    for dr in ('forward', 'backward')}
    assert {r['target'] for r in quick if r['kernel'] == 'topk_mask'} == {'sm_80', 'sm_90'}
    for r in quick:
        assert 'error' not in r, r
        assert r['auto'], r  # the paper's configuration is what 'auto' runs on a GPU
        assert r['spill_bytes'] == 0, r
        assert 0 < r['registers'] <= 255, r
        assert r['shared_bytes'] <= r['shared_limit'], r


@pytest.mark.parametrize('target,head_dim,warps,what', [
    ('sm_90', 48, 4, 'spill'),    # the Hopper backward at head dim 48 spills with four warps (the config takes eight)
    ('sm_80', 96, 8, 'shared'),   # an A100 has 163 KB of shared memory a program; this backward needs 176 KB
])
def test_the_report_sees_what_the_policy_refuses(target, head_dim, warps, what):
    """The measuring can fail a variant: configurations that spill or need more shared memory than the GPU has are
    reported as not fitting (each compiles in seconds)."""
    rec = _run(f"""
import json, kernel_resources as kr
from dagman_fast.kernels import window_attention_triton as wa
orig = wa.window_attention_config
wa.window_attention_config = lambda wn, hd, dtype, backward=False: {{**orig(wn, hd, dtype, backward), 'num_warps': {warps}}}
v = dict(kernel='window_attention', target='{target}', dtype='bf16', head_dim={head_dim}, window='4x4x4',
         shifted=True, direction='backward', _window=(4, 4, 4))
print(json.dumps(kr.compile_variant(v)))""")
    assert 'error' not in rec and not rec['fits'], rec
    if what == 'spill':
        assert rec['spill_bytes'] > 0, rec
    else:
        assert rec['shared_bytes'] > rec['shared_limit'] == 163 * 1024, rec


def test_auto_refuses_what_does_not_fit():
    "The dispatch policy, from the report's measurements (BENCHMARKS.md): checked on its own, without compiling."
    from dagman_fast.kernels.window_attention_triton import fused_config_supported as ok
    assert ok(64, 12, 'bf16', 80) and ok(64, 24, 'fp16', 90) and ok(8, 12, 'bf16', 86)   # swin-smit, everywhere
    assert ok(64, 48, 'bf16', 90) and not ok(64, 48, 'bf16', 80)   # hd 48: Hopper only (A100 backward spills)
    assert not ok(64, 96, 'bf16', 90)                               # hd 96 spills on both
    assert ok(64, 16, 'fp32', 80) and not ok(64, 24, 'fp32', 90)   # fp32 spills from hd 24
    assert not ok(128, 12, 'bf16', 90)                              # 128-token windows spill in the backward
    assert not ok(64, 12, 'bf16', 75)                               # no bf16 tensor cores before Ampere
