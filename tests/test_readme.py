"""The README stays true: its quick start runs and prints what it says, and its commands name files that exist."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / 'README.md'


def _python_blocks(text):
    return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_quick_start_runs_and_shapes_match_its_comments():
    code = _python_blocks(README.read_text())[0]  # the encoder quick start (the data one needs user paths)
    ns = {}
    exec(compile(code, 'README quick start', 'exec'), ns)
    out = ns['out']
    assert [tuple(f.shape) for f in out.features] == [
        (2, 24, 32, 32, 32), (2, 48, 16, 16, 16), (2, 96, 8, 8, 8), (2, 192, 4, 4, 4), (2, 384, 2, 2, 2)]
    assert out.cls.shape == (2, 192) and out.patch_tokens.shape == (2, 64, 192)
    assert out.attn.shape == (2, 64) and out.attn_heads.shape == (2, 4, 64)
    # from_monai gives back the same function as the MONAI module it was built from
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ours, theirs = ns['encoder2'].eval().forward_features(x), ns['monai_swin'].eval()(x, normalize=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_commands_name_existing_files():
    text = README.read_text()
    for marker in ('main-command', 'test-command'):
        block = re.search(rf'<!-- {marker} -->\n```bash\n(.*?)\n```\n<!-- /{marker} -->', text, flags=re.S)
        assert block, f'README lost its {marker} block (CI runs it)'
        for path in re.findall(r'(bench/\S+\.py)', block.group(1)):
            assert (README.parent / path).exists(), path
