"""FLOP counts and MFU peaks (issue 28): `count_flops` on the encoder against a count by hand from the architecture."""
import pytest
import torch

from dagman_fast.swin import build_encoder
from dagman_fast.train_utils import PEAK_TFLOPS, count_flops, peak_tflops
from dagman_fast.windows import window_and_shift


def swin_forward_flops(cfg, size: int, batch: int) -> int:
    """Multiply-adds x 2 of a Swin encoder's forward, from its config alone: patch-embedding convolution, per block
    qkv, attention (q k^T and attn v), projection and MLP, and the patch merging after each stage."""
    p, c = cfg.patch_size, cfg.embed_dim
    g = size // p
    n = g ** 3
    total = 2 * n * cfg.in_channels * p ** 3 * c
    for depth in cfg.depths:
        win, _ = window_and_shift((g,) * 3, (cfg.window_size,) * 3, (0,) * 3)
        wn = win[0] * win[1] * win[2]
        hidden = int(c * cfg.mlp_ratio)
        per_block = 2 * n * c * 3 * c + 2 * 2 * n * wn * c + 2 * n * c * c + 2 * 2 * n * c * hidden
        total += depth * per_block
        total += 2 * (n // 8) * 8 * c * 2 * c  # merging: 8c -> 2c on n/8 tokens
        g, n, c = g // 2, n // 8, 2 * c
    return batch * total


@pytest.mark.parametrize('preset,size,batch', [('swin-tiny', 32, 1), ('swin-tiny', 64, 2), ('swin-smit', 32, 1)])
def test_encoder_flops_match_a_count_by_hand(preset, size, batch):
    enc = build_encoder(preset, sa_stage=None, attn_impl='reference')
    x = torch.randn(batch, 1, size, size, size)
    with torch.no_grad():
        _, fwd = count_flops(enc.forward_features, x)
    assert fwd == swin_forward_flops(enc.config, size, batch)
    # forward + backward: every matmul's backward is two matmuls of its size; the patch embedding's input needs no
    # gradient, so its convolution's backward is the weight gradient alone (one of its size)
    _, both = count_flops(lambda: sum(f.sum() for f in enc.forward_features(x)).backward())
    conv = 2 * batch * (size // enc.config.patch_size) ** 3 * enc.config.patch_size ** 3 * enc.config.embed_dim
    assert both == 3 * fwd - conv


def test_peak_tflops_reads_the_table_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'NVIDIA H100 PCIe')
    assert peak_tflops('cuda', torch.bfloat16) == (PEAK_TFLOPS['H100 PCIe']['bf16'], 'H100 PCIe bf16 data sheet')
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'NVIDIA H200')
    assert peak_tflops('cuda', torch.float32)[0] == 494.0
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'NVIDIA GeForce RTX 3090')
    peak, src = peak_tflops('cuda')
    assert peak == 0.0 and 'not in PEAK_TFLOPS' in src
