"""The encoder on real volumes from `../shared/data` (skipped with a reason when the folder is absent).

Random-weight equivalence tests could miss what only real intensity statistics show (large homogeneous regions,
sharp edges, saturated windows); these run the same MONAI comparison on real CT and real masks.
"""
import numpy as np
import pytest
import torch

from conftest import GRAD_TOL, assert_maps_close, map_loss, monai_twin, ours_to_monai_name, randomize_, tiny_encoder


def _hu_to_unit(hu: np.ndarray, lo: float = -175.0, hi: float = 250.0) -> torch.Tensor:
    "The soft-tissue window of the design card, clipped to [0, 1]."
    return torch.from_numpy(((np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo)))


@pytest.mark.parametrize('attn_impl', ['sdpa', 'reference'])
def test_lidc_nodule_crops_match_monai(shared_data, attn_impl):
    "Real chest CT (LIDC-IDRI nodule crops, 64^3 at 1 mm): maps and parameter gradients equal MONAI's."
    path = shared_data / 'lidc_idri' / 'lidc_idri_0001-0003_nodules.npz'
    if not path.exists():
        pytest.skip(f'{path.name} not in the shared data')
    with np.load(path) as f:
        x = _hu_to_unit(f['images_64'][:2])[:, None]  # (2, 1, 64, 64, 64)
    assert 0.05 < x.mean() < 0.95 and x.std() > 0.1, 'a real crop, not an empty or saturated one'
    enc = randomize_(tiny_encoder(merging='legacy', attn_impl=attn_impl)).train()
    twin = monai_twin(enc)
    ours, theirs = enc.forward_features(x), twin(x, normalize=True)
    assert_maps_close([m.detach() for m in ours], [m.detach() for m in theirs])
    map_loss(ours).backward()
    map_loss(theirs).backward()
    monai_params = dict(twin.named_parameters())
    for name, p in enc.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, monai_params[ours_to_monai_name(name)].grad, **GRAD_TOL,
                                       msg=lambda m, name=name: f'{name}: {m}')


def test_adrenal_masks_with_sa_and_mask_token(shared_data):
    "Real AdrenalMNIST3D volumes (64^3): SA outputs are well-formed and masking changes exactly the masked patches."
    path = shared_data / 'medmnist' / 'adrenalmnist3d_64.npz'
    if not path.exists():
        pytest.skip(f'{path.name} not in the shared data')
    with np.load(path) as f:
        x = torch.from_numpy(f['test_images'][:2].astype(np.float32) / 255.0)[:, None]
    enc = tiny_encoder(sa_stage=3).eval()
    mask = torch.zeros(2, 32, 32, 32, dtype=torch.bool)
    mask[:, :, :, 16:] = True
    with torch.no_grad():
        out, masked = enc(x), enc(x, mask)
    assert out.attn.shape == (2, 64) and torch.isfinite(out.attn).all()
    assert torch.all((out.attn_heads.sum(-1) > 0) & (out.attn_heads.sum(-1) < 1))  # [CLS] keeps some for itself
    torch.testing.assert_close(masked.features[0][..., :16], out.features[0][..., :16])
    assert (masked.features[0][..., 16:] - out.features[0][..., 16:]).abs().amax() > 0.1
