"""Gradient checkpointing per Swin stage (`SwinConfig.use_checkpoint`: True, False or stage numbers): the config's
choices and errors, which blocks are recomputed, and identical gradients of a whole DAGMaN pretraining step (teacher
guide, student forward, `model.loss`, backward) with and without it, directly and through the fastai learner.

The memory it saves is measured by `bench/bench_checkpointing.py` (not a test).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader

from conftest import map_loss, tiny_encoder
from dagman_fast.learner import dagman_learner
from dagman_fast.model import DAGMaNConfig, DAGMaNModel
from dagman_fast.encoder_configs import SwinConfig, ViTConfig, encoder_config
from dagman_fast.swin import SwinEncoder

CROP = 32
HEADS = dict(out_dim=64, head_hidden=32, head_bottleneck=16)


def enc_cfg(**kw) -> SwinConfig:
    """A tiny Swin with SA after stage 3 (a 32^3 crop: 8 cells) and a large drop path, so that the student's random
    draws matter and a checkpoint that did not replay them would change the gradients."""
    base = dict(img_size=CROP, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), sa_stage=3, sa_num_heads=4,
                drop_path_rate=0.5, attn_impl='auto')
    base.update(kw)
    return SwinConfig(**base)


# ---------------------------------------------------------------------------------------------------------------
# 1. The config: choices, canonical form, JSON round trip, errors
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('value,canonical,stages', [
    (False, False, ()),  # the default: no checkpointing
    (True, True, (1, 2, 3, 4)),  # every stage (the bool of earlier versions)
    ((1, 2), (1, 2), (1, 2)),  # a subset
    ([2, 1, 2], (1, 2), (1, 2)),  # a list, unsorted, repeated (as JSON or a user may give it): sorted, unique
    ((3,), (3,), (3,)),  # one stage
    ((), False, ()),  # no stage is False
    ((1, 2, 3, 4), True, (1, 2, 3, 4)),  # every stage is True, so equal choices compare equal
])
def test_use_checkpoint_choices_round_trip(value, canonical, stages):
    cfg = SwinConfig(use_checkpoint=value)
    assert cfg.use_checkpoint == canonical and type(cfg.use_checkpoint) is type(canonical)
    assert cfg.checkpoint_stages == stages
    back = SwinConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # tuples come back as lists
    assert back == cfg and back.use_checkpoint == canonical and type(back.use_checkpoint) is type(canonical)
    enc = SwinEncoder(replace(enc_cfg(), use_checkpoint=value))
    assert [s.use_checkpoint for s in enc.stages] == [i in stages for i in (1, 2, 3, 4)]
    assert [b.use_checkpoint for s in enc.stages for b in s.blocks] == [i in stages for i in (1, 2, 3, 4) for _ in (0, 1)]


@pytest.mark.parametrize('value,match', [
    ((0,), r'stage\(s\) \[0\] do not exist; valid stage numbers are \(1, 2, 3, 4\)'),  # stages are 1-based
    ((1, 5), r'stage\(s\) \[5\] do not exist'),  # beyond the last stage
    (1, r'use_checkpoint must be True .* got 1; for stage 1 alone write \(1,\)'),  # ambiguous: once meant True
    ('true', r"use_checkpoint must be True .* got 'true'"),  # a string is not a bool
    ((True,), r'use_checkpoint must be True'),  # bools are not stage numbers
    ((1.0,), r'use_checkpoint must be True'),
])
def test_use_checkpoint_errors(value, match):
    with pytest.raises(ValueError, match=match):
        SwinConfig(use_checkpoint=value)


def test_use_checkpoint_validated_against_depths():
    "The valid stage numbers follow `depths` (here 2 stages), in the config and in `encoder_config` overrides."
    with pytest.raises(ValueError, match=r'stage\(s\) \[3\] do not exist; valid stage numbers are \(1, 2\)'):
        SwinConfig(depths=(2, 2), num_heads=(3, 6), sa_stage=2, use_checkpoint=(3,))
    assert encoder_config('swin-tiny', use_checkpoint=[2]).use_checkpoint == (2,)


def test_vit_use_checkpoint_is_a_bool():
    "A ViT has no stages: a tuple is refused with the reason; True and False round-trip as before."
    with pytest.raises(ValueError, match='ViTConfig.use_checkpoint must be True or False .*no stages'):
        ViTConfig(use_checkpoint=(1,))
    cfg = ViTConfig(use_checkpoint=True)
    assert ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------------------------------------------------------
# 2. Only the chosen stages are recomputed
# ---------------------------------------------------------------------------------------------------------------

def _count_branch_calls(enc: SwinEncoder) -> dict:
    "Count each block's residual-branch calls, the checkpoint's recomputation included (forward hooks miss it)."
    counts = {}
    for si, stage in enumerate(enc.stages, 1):
        for bi, blk in enumerate(stage.blocks):
            for name in ('attn_residual', 'mlp_residual'):
                key, branch = (si, bi, name), getattr(blk, name)
                counts[key] = 0

                def run(*args, _key=key, _branch=branch, **kwargs):
                    counts[_key] += 1
                    return _branch(*args, **kwargs)
                setattr(blk, name, run)
    return counts


@pytest.mark.parametrize('use_checkpoint,recomputed', [
    ((1, 3), {1, 3}),  # a subset: its blocks run twice, the others once
    (False, set()),  # the negative control: nothing runs twice
    (True, {1, 2, 3, 4}),
])
def test_stage_subset_recomputes_only_its_blocks(use_checkpoint, recomputed):
    enc = tiny_encoder(use_checkpoint=use_checkpoint).train()
    counts = _count_branch_calls(enc)
    map_loss(enc.forward_features(torch.randn(1, 1, 32, 32, 32))).backward()
    want = {key: 2 if key[0] in recomputed else 1 for key in counts}
    assert counts == want


# ---------------------------------------------------------------------------------------------------------------
# 3. A whole pretraining step: identical loss and gradients
# ---------------------------------------------------------------------------------------------------------------

def _pretrain_step(model: DAGMaNModel, views, drop_mask, seed: int = 0) -> torch.Tensor:
    "Teacher guide (masks from a seeded generator), student forward (drop path from the seeded global RNG), loss, backward."
    model.zero_grad(set_to_none=True)
    guide = model.guide(views, drop_mask, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    pred = model(*views, cell_mask=guide['cell_mask'])
    loss = model.loss(pred, guide)
    loss.backward()
    return loss.detach()


def _student_grads(model: DAGMaNModel) -> dict:
    return {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}


@pytest.fixture(scope='module')
def reference_step():
    "The step without checkpointing: model weights, inputs, loss, gradients (and those of another drop-path draw)."
    torch.manual_seed(0)
    # float64: the defaults' sharp teacher (temperature 0.02), BatchNorm heads and KoLeo amplify the backward's
    # accumulation order, which checkpointing may change, to ~5e-5 in float32; in float64 it stays ~1e-12
    model = DAGMaNModel(enc_cfg(), DAGMaNConfig(**HEADS)).double().train()
    g = torch.Generator().manual_seed(1)
    base = F.interpolate(torch.rand(2, 1, 8, 8, 8, generator=g), size=(CROP,) * 3, mode='trilinear').double()
    views = [(base + 0.05 * torch.randn(base.shape, generator=g)).clamp(0, 1) for _ in range(2)]
    drop_mask = torch.rand(4, 16, 16, 16, generator=g) < 0.1  # the noisy teacher's patch dropout, both views
    loss = _pretrain_step(model, views, drop_mask)
    grads = _student_grads(model)
    other = (_pretrain_step(model, views, drop_mask, seed=1), _student_grads(model))
    return dict(state=model.state_dict(), views=views, drop_mask=drop_mask, loss=loss, grads=grads, other=other)


@pytest.mark.parametrize('use_checkpoint', [
    True,  # every block recomputed
    (1, 3),  # a subset, with the SA stage (3) among the checkpointed ones
    (2,),  # a subset without the first stage (the one the memory benchmark cares about most)
])
def test_pretraining_step_gradients_identical(reference_step, use_checkpoint):
    ref = reference_step
    model = DAGMaNModel(enc_cfg(use_checkpoint=use_checkpoint), DAGMaNConfig(**HEADS)).double().train()
    model.load_state_dict(ref['state'])
    assert model.student.encoder.config.checkpoint_stages == SwinConfig(use_checkpoint=use_checkpoint).checkpoint_stages
    loss = _pretrain_step(model, ref['views'], ref['drop_mask'])
    # the same operations in the same order (the recomputation replays drop path's draws): the tolerance only covers
    # the backward's accumulation order, which checkpointing may change
    torch.testing.assert_close(loss, ref['loss'], rtol=1e-6, atol=1e-7)
    grads = _student_grads(model)
    assert grads.keys() == ref['grads'].keys() and len(grads) > 50
    for n, g in grads.items():
        torch.testing.assert_close(g, ref['grads'][n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f'{n}: {m}')


def test_pretraining_step_comparison_can_fail(reference_step):
    """The negative control of the test above: another drop-path draw (what a checkpoint that did not replay the
    random state would give) changes the loss and gradients far beyond its tolerance."""
    loss, grads = reference_step['other']
    assert (loss - reference_step['loss']).abs() > 1e-4
    worst = max(((g - reference_step['grads'][n]).abs().max().item() for n, g in grads.items()))
    assert worst > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# 4. Through the fastai learner
# ---------------------------------------------------------------------------------------------------------------

class _Views(torch.utils.data.Dataset):
    crop = (CROP,) * 3

    def __init__(self, n: int = 2):
        self.vols = F.interpolate(torch.rand(n, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0)),
                                  size=(CROP,) * 3, mode='trilinear')

    def __len__(self):
        return len(self.vols)

    def __getitem__(self, i):
        v = self.vols[i]
        return tuple((v + 0.05 * torch.randn_like(v)).clamp(0, 1) for _ in range(2))


@pytest.mark.parametrize('use_checkpoint,stages', [(True, (1, 2, 3, 4)), ((1,), (1,))])
def test_learner_trains_with_checkpointing(tmp_path, use_checkpoint, stages):
    dls = DataLoaders(DataLoader(_Views(), bs=2, drop_last=True), DataLoader(_Views(), bs=2))
    dls.n_inp = 2
    learn = dagman_learner(dls, encoder='swin-tiny', use_checkpoint=use_checkpoint, path=tmp_path, checkpoint=None,
                           log=None, **HEADS)
    cfg = learn.model.encoder_config
    assert cfg.checkpoint_stages == stages and cfg.to_dict()['use_checkpoint'] == cfg.use_checkpoint
    assert [s.use_checkpoint for s in learn.model.student.encoder.stages] == [i in stages for i in (1, 2, 3, 4)]
    before = {n: p.detach().clone() for n, p in learn.model.student.encoder.named_parameters()}
    counts = _count_branch_calls(learn.model.student.encoder)
    learn.fit(1)
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
    after = dict(learn.model.student.encoder.named_parameters())
    assert any((after[n] - p).abs().max() > 0 for n, p in before.items())  # one step was taken
    # one training batch: the chosen stages' blocks ran twice (forward, recomputation), the others once (the
    # validation batch adds one no-grad call to every block)
    assert counts == {k: (3 if k[0] in stages else 2) for k in counts}
