"""Shared helpers for the `dagman_fast` test suite.

Everything runs on the CPU with tiny configs (embed_dim 12, two blocks a stage) so that the whole suite stays
within a few minutes on two cores.
"""
from __future__ import annotations

import re

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformer as MonaiSwinTransformer

from dagman_fast.encoder_configs import SwinConfig
from dagman_fast.monai_interop import monai_swin_kwargs, to_monai
from dagman_fast.swin import SwinEncoder

# The contract for the five fp32 output maps (MONAI equivalence, impl equivalence).
MAP_TOL = dict(atol=1e-5, rtol=1e-5)
# Parameter gradients go through many more reductions than the maps.
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same RNG state, so random weights and inputs are reproducible."
    torch.manual_seed(0)
    yield


def tiny_config(**overrides) -> SwinConfig:
    "A four-stage Swin small enough for CPU tests; SA off unless asked for."
    kw = dict(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, sa_stage=None,
              img_size=64, sa_num_heads=4, drop_path_rate=0.0)
    kw.update(overrides)
    return SwinConfig(**kw)


def tiny_encoder(**overrides) -> SwinEncoder:
    return SwinEncoder(tiny_config(**overrides))


def randomize_(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Replace every parameter by random values (LayerNorm weights around 1): the default init leaves biases at
    zero and LayerNorms at identity, which would hide mistakes in those parameters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ('norm' in name):
                p.copy_(1 + std * torch.randn_like(p) if name.endswith('weight') else std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return module


def monai_twin(encoder: SwinEncoder) -> MonaiSwinTransformer:
    "A MONAI SwinTransformer built by MONAI from the encoder's config, holding the encoder's weights (strict load)."
    twin = MonaiSwinTransformer(**monai_swin_kwargs(encoder.config))
    twin.load_state_dict(to_monai(encoder), strict=True)
    return twin.train(encoder.training)


def ours_to_monai_name(name: str) -> str:
    """Our parameter name -> MONAI's, written here independently of the library's own mapping:
    `stages.i.` is MONAI's `layers{i+1}.0.`, and MONAI's MLPBlock calls fc1/fc2 linear1/linear2."""
    name = re.sub(r'^stages\.(\d+)\.', lambda m: f'layers{int(m[1]) + 1}.0.', name)
    return name.replace('.mlp.fc1.', '.mlp.linear1.').replace('.mlp.fc2.', '.mlp.linear2.')


def assert_maps_close(ours, theirs, **tol):
    "Compare two lists of feature maps, shape and values, with the fp32 contract unless told otherwise."
    tol = tol or MAP_TOL
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f'map {i}: {tuple(a.shape)} vs {tuple(b.shape)}'
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f'map {i}: {m}')


def map_loss(maps) -> torch.Tensor:
    """A scalar that depends on every element of every map: each map against a fixed random tensor of its shape.

    (A sum of mean squares would not do: the maps are layer-normalised over channels, so the mean square of each is
    1 up to the LayerNorm epsilon whatever the weights, and every gradient would be ~1e-7, below any tolerance.)
    """
    total = 0.0
    for m in maps:
        g = torch.Generator().manual_seed(m.numel())
        r = torch.randn(m.shape, generator=g, dtype=m.dtype)
        total = total + (m * r).sum() / m.numel() ** 0.5
    return total


SHARED_DATA = __import__('pathlib').Path(__file__).resolve().parents[2] / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data():
    "The real data folder `../shared/data` beside the checkout (read-only); tests using it skip when it is absent."
    if not SHARED_DATA.is_dir():
        pytest.skip('real data not found: ../shared/data beside the checkout (see its README for the sources)')
    return SHARED_DATA


def pytest_configure(config):
    os = __import__('os')
    if os.environ.get('PYTEST_XDIST_WORKER'):
        # under `-n 2`: one thread per worker and per process it starts (torchrun, the CLI), so that two workers never
        # run more threads than the machine has cores
        torch.set_num_threads(1)
        os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    config.addinivalue_line('markers', 'slow: an end-to-end test of ten seconds or more (several processes, a whole run); the test command of the README leaves them out, CI runs them: `pytest -m slow -n 2`')
    config.addinivalue_line('markers', 'shared: needs the real data in ../shared/data (skips with a reason without it)')


def pytest_collection_modifyitems(config, items):
    "Every test that reads the real data is marked `shared`, so `-m shared` runs exactly those (CI, with the data)."
    for item in items:
        if 'shared_data' in getattr(item, 'fixturenames', ()):
            item.add_marker(pytest.mark.shared)
