"""bf16 autocast on the CPU (`amp='bf16'`): the mixed-precision paths of pretraining, exercised without a GPU."""
from __future__ import annotations

import math

import pytest
import torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from test_learner import LossLog, make_learner, quiet_fit

from dagman_fast.callback_base import unwrap
from dagman_fast.train_utils import DeviceMixedPrecision


class KeepGrads(Callback):
    "The student's gradients of the first training step, as the optimiser gets them (after clipping)."
    order = 99

    def before_step(self):
        if not hasattr(self, 'grads'):
            self.grads = {k: p.grad.detach().float().clone() for k, p in unwrap(self.model).student.named_parameters()
                          if p.grad is not None}


class SeeDtypes(Callback):
    "The dtype of the student's logits: fp32 with and without autocast (the heads run outside it)."
    order = 9

    def after_pred(self):
        self.dtype = self.pred['s_gitd'].dtype
        self.enc_dtype = self.pred['recon'].dtype


def _one_step(tmp_path, amp, **kw):
    set_seed(0)
    learn = make_learner(tmp_path, masking='random', amp=amp, checkpoint=None, log=None, **kw)
    keep, see = KeepGrads(), SeeDtypes()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=[keep, see, LossLog(stop=1)])
    return keep.grads, (see.dtype, see.enc_dtype)


@pytest.mark.parametrize('settings', ['dino', 'defaults'])
def test_bf16_autocast_runs_on_the_cpu_with_gradients_close_to_fp32(tmp_path, settings):
    from dagman_fast.model import DINO_DISTILL
    kw = dict(DINO_DISTILL) if settings == 'dino' else {}
    learn = make_learner(tmp_path, amp='bf16', checkpoint=None, log=None)
    assert any(isinstance(c, DeviceMixedPrecision) for c in learn.cbs)
    g32, d32 = _one_step(tmp_path / 'fp32', False, **kw)
    g16, d16 = _one_step(tmp_path / 'bf16', 'bf16', **kw)
    assert d32 == (torch.float32, torch.float32)
    assert d16 == (torch.float32, torch.bfloat16)  # autocast ran the student in bf16; the heads run in fp32
    assert g32.keys() == g16.keys() and len(g32) > 50
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[k].flatten() for k in g32])
    assert torch.isfinite(flat16).all()
    rel = ((flat16 - flat32).norm() / flat32.norm()).item()
    cos = torch.nn.functional.cosine_similarity(flat16, flat32, dim=0).item()
    if settings == 'dino':
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation); through the encoder, the heads and the
        # backward pass the whole gradient stays within a few per cent of fp32 and points the same way.
        assert rel < 0.05 and cos > 0.998, (rel, cos)
    else:
        # BatchNorm in the heads standardises the differences between samples, which for this untrained model on
        # smooth volumes are about as small as bf16's rounding of the encoder's features: the gradient still points
        # the same way, but is amplified noise in part (0.35 of its norm here; 0.70 with the heads in bf16)
        assert rel < 0.6 and cos > 0.9, (rel, cos)
    assert rel > 1e-4  # and it is not the fp32 computation again
    enc16 = torch.cat([g16[k].flatten() for k in g32 if k.startswith('encoder.')])
    assert torch.isfinite(enc16).all()


@pytest.mark.slow
def test_bf16_losses_stay_finite_and_a_checkpoint_resumes(tmp_path):
    set_seed(0)
    full, rf = make_learner(tmp_path / 'full', amp='bf16'), LossLog()
    quiet_fit(full, 2, cbs=[rf])
    assert len(rf.losses) == 4 and all(math.isfinite(x) for x in rf.losses)
    set_seed(0)
    part, rp = make_learner(tmp_path / 'part', amp='bf16'), LossLog(stop=1)
    quiet_fit(part, 2, cbs=[rp])
    set_seed(1234)
    again, ra = make_learner(tmp_path / 'part', amp='bf16'), LossLog()
    start = again.resume(tmp_path / 'part' / 'models' / 'checkpoint.pth')
    assert start == 1
    quiet_fit(again, 2, cbs=[ra], start_epoch=start)
    torch.testing.assert_close(torch.tensor(rp.losses + ra.losses), torch.tensor(rf.losses), rtol=1e-5, atol=1e-6)
    a, b = full.model.state_dict(), again.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fp16_on_the_cpu_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(ValueError, match="amp='fp16' needs CUDA.*amp='bf16'"):
        make_learner(tmp_path, amp='fp16')
    with pytest.raises(ValueError, match='amp'):
        make_learner(tmp_path, amp='fp8')
