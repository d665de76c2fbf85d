"""The pretraining engine: teacher, masks, losses, schedules, checkpoints and resume, export, methods."""
from __future__ import annotations

import csv
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import set_seed
from monai.networks.nets.swin_unetr import SwinTransformer as MonaiSwinTransformer

from dagman_fast.callbacks import AttentionGuidedMasking, EMATeacher, NoisyTeacher
from dagman_fast.checkpoint import CHECKPOINT_FORMAT, DAGMaNCheckpoint, load_checkpoint, load_encoder
from dagman_fast.learner import dagman_learner
from dagman_fast.model import METHODS, DAGMaNConfig
from dagman_fast.train_utils import StepTimer
from dagman_fast.losses import TokenBatchNorm
from dagman_fast.encoder_configs import SwinConfig, ViTConfig
from dagman_fast.monai_interop import monai_swin_kwargs, to_monai

CROP = 32
HEADS = dict(out_dim=64, head_hidden=32, head_bottleneck=16)


def enc_cfg(**kw) -> SwinConfig:
    "A tiny Swin with SA after stage 3: a 32^3 crop gives a 16^3 patch grid and 2^3 = 8 cells."
    base = dict(img_size=CROP, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), sa_stage=3, sa_num_heads=4,
                drop_path_rate=0.1)
    base.update(kw)
    return SwinConfig(**base)


class Views(torch.utils.data.Dataset):
    "Two noisy views of smooth random volumes (enough structure for the losses to move)."
    crop = (CROP,) * 3

    def __init__(self, n: int = 4, views: int = 2):
        g = torch.Generator().manual_seed(0)
        base = torch.rand(n, 1, 8, 8, 8, generator=g)
        self.vols = F.interpolate(base, size=(CROP,) * 3, mode='trilinear')
        self.views = views

    def __len__(self):
        return len(self.vols)

    def __getitem__(self, i):
        v = self.vols[i]
        return tuple((v + 0.05 * torch.randn_like(v)).clamp(0, 1) for _ in range(self.views))


def make_dls(n=4, bs=2, views=2):
    dls = DataLoaders(DataLoader(Views(n, views), bs=bs, shuffle=True, drop_last=True), DataLoader(Views(2, views), bs=bs))
    dls.n_inp = views
    return dls


def make_learner(tmp_path, method='dagman', encoder=None, **kw):
    return dagman_learner(make_dls(), method=method, encoder=encoder or enc_cfg(), path=tmp_path, lr=1e-3,
                          **{**HEADS, **kw})


class LossLog(Callback):
    "Raw per-step training losses; optionally stops the fit after `stop` epochs (after the checkpoint is written)."
    order = 100

    def __init__(self, stop=None):
        self.losses, self.stop = [], stop

    def after_loss(self):
        if self.training:
            self.losses.append(float(self.loss.detach()))

    def after_epoch(self):
        if self.stop is not None and self.epoch + 1 == self.stop:
            raise CancelFitException


def quiet_fit(learn, n, **kw):
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(n, **kw)


# ---------------------------------------------------------------- teacher


def test_teacher_never_gets_gradients_and_follows_the_ema(tmp_path):
    learn = make_learner(tmp_path)
    m = learn.model
    assert not any(p.requires_grad for p in m.teacher.parameters())
    opt_params = {id(p) for pg in learn.splitter(m) for p in pg}
    assert not opt_params & {id(p) for p in m.teacher.parameters()}, 'teacher parameters reached the optimiser'
    before = [p.clone() for p in m.teacher.parameters()]

    class Grads(Callback):
        order = 35  # after the backward, before the EMA

        def after_backward(self):
            assert all(p.grad is None for p in self.model.teacher.parameters())
            self.seen = True

    g = Grads()
    quiet_fit(learn, 1, cbs=[g])
    assert g.seen
    assert not m.teacher.training and all(not mod.training for mod in m.teacher.modules())
    assert any(not torch.equal(a, b) for a, b in zip(before, m.teacher.parameters())), 'the EMA never moved the teacher'
    m.train()
    assert m.student.training and not m.teacher.training


def test_update_teacher_is_the_ema_formula(tmp_path):
    m = make_learner(tmp_path).model
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.clone() for p in m.teacher.parameters()]
    m.update_teacher(0.9)
    for a, s, t in zip(t0, m.student.parameters(), m.teacher.parameters()):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * s)


def test_ema_momentum_is_a_cosine_over_the_planned_run():
    cb = EMATeacher()
    cb.m0 = 0.996
    assert cb.momentum_at(0, 100) == pytest.approx(0.996)
    assert cb.momentum_at(50, 100) == pytest.approx(0.998)
    assert cb.momentum_at(100, 100) == pytest.approx(1.0)
    assert cb.momentum_at(150, 100) == pytest.approx(1.0)
    assert cb.momentum_at(25, 100) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert cb.momentum_at(7, 0) == pytest.approx(0.996)  # no plan yet (lr_find): the start value


@pytest.mark.parametrize('warmup, plan', [(2, (0, 0)), ('50%', (0, 20)), ('10 steps', (0, 0))])
def test_teacher_temperature_warms_up_with_the_global_step(tmp_path, warmup, plan):
    "2 epochs of 5 steps, half of a 20-step run, or 10 steps: the same warm-up over 10 steps of the global step."
    m = make_learner(tmp_path, teacher_temp=0.04, teacher_temp_final=0.07, teacher_temp_warmup=warmup).model
    m.iters_per_epoch = 5
    m.plan(*plan)
    assert float(m.teacher_temp()) == pytest.approx(0.04)
    m.step.fill_(5)
    assert float(m.teacher_temp()) == pytest.approx(0.055)
    m.step.fill_(50)
    assert float(m.teacher_temp()) == pytest.approx(0.07)


# ---------------------------------------------------------------- masks and losses


def test_attention_guided_mask_comes_from_the_teachers_attention(tmp_path):
    m = make_learner(tmp_path, hint_ratio=0.0, mask_ratio=0.5).model.eval()
    x = torch.rand(3, 1, CROP, CROP, CROP)
    guide = m.guide([x])
    attn = m.teacher.encoder(x).attn
    k = int(0.5 * 8)
    ref = torch.zeros(3, 8, dtype=torch.bool)
    for i in range(3):
        ref[i, sorted(range(8), key=lambda j: -attn[i, j].item())[:k]] = True
    torch.testing.assert_close(guide['cell_mask'], ref)


def test_student_mask_covers_whole_cells_of_the_patch_grid(tmp_path):
    m = make_learner(tmp_path).model.eval()
    x = torch.rand(1, 1, CROP, CROP, CROP)
    cell = torch.zeros(1, 8, dtype=torch.bool)
    cell[0, 5] = True  # cell (1, 0, 1) of the 2x2x2 grid: patches [8:16, 0:8, 8:16] of the 16^3 patch grid
    patch = torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    patch[0, 8:16, 0:8, 8:16] = True
    pred = m(x, cell)
    ref = m.student.encoder(x, patch)
    torch.testing.assert_close(pred['s_gitd'], m.student.heads['gitd'](ref.features[-1].mean((2, 3, 4))))
    unmasked = m.student.encoder(x)
    assert not torch.allclose(unmasked.features[-1], ref.features[-1])


@pytest.mark.parametrize('kw, weights', [
    ({}, dict(aitd=0.1, ampd=0.1, gitd=0.1, amip=1.0)),                # the paper's Appendix A
    ({'loss_weights': {'gitd': 0.3, 'amip': 2}}, dict(aitd=0.1, ampd=0.1, gitd=0.3, amip=2.0)),
])
def test_total_loss_is_the_weighted_sum_of_the_terms(tmp_path, kw, weights):
    m = make_learner(tmp_path, **kw).model.train()
    views = [torch.rand(2, 1, CROP, CROP, CROP) for _ in range(2)]
    guide = m.guide(views)
    total = m.loss(m(*views, guide['cell_mask']), guide)
    t = m.terms
    assert set(t) == {'aitd', 'ampd', 'gitd', 'amip', 'koleo'}  # KoLeo: koleo_weight, 0.1 by default
    torch.testing.assert_close(total.detach(), sum(weights[k] * t[k] for k in t if k != 'koleo') + 0.1 * t['koleo'])


def test_defaults_are_the_papers(tmp_path):
    from dagman_fast.encoder_configs import PRESETS
    learn = make_learner(tmp_path)
    c = learn.model.config
    assert c.loss_weights == dict(aitd=0.1, ampd=0.1, gitd=0.1, amip=1.0)
    assert (c.masking, c.mask_ratio, c.noisy_teacher, c.patch_drop_fill, c.valid_noise) == (
        'attention', 0.7, True, 'zero', False)
    assert PRESETS['swin-smit'].drop_path_rate == 0.1
    learn.create_opt()
    h = learn.opt.hypers[0]
    assert (h['mom'], h['sqr_mom'], h['eps'], learn.wd) == (0.9, 0.999, 1e-8, 0.05)  # AdamW (fit sets wd)


@pytest.mark.parametrize('cross_view', [True, False])
def test_global_loss_pairs_the_views(tmp_path, cross_view):
    m = make_learner(tmp_path, losses=('gitd',), cross_view=cross_view).model.eval()  # eval: centres stay at zero
    views = [torch.rand(2, 1, CROP, CROP, CROP) for _ in range(2)]
    guide = m.guide(views)
    pred = m(*views, guide['cell_mask'])
    m.loss(pred, guide)
    s, t = pred['s_gitd'].view(2, 2, -1), guide['t_gitd'].view(2, 2, -1)
    tt = float(m.teacher_temp())

    def ce(si, ti):
        return -(F.softmax(ti / tt, -1) * F.log_softmax(si / 0.1, -1)).sum(-1).mean()

    if cross_view:  # student view i against teacher view j != i
        torch.testing.assert_close(m.terms['gitd'], (ce(s[0], t[1]) + ce(s[1], t[0])) / 2)
    else:  # each view against the teacher's same view
        torch.testing.assert_close(m.terms['gitd'], (ce(s[0], t[0]) + ce(s[1], t[1])) / 2)


def test_loss_switches_and_ampd_on_masked_cells_only(tmp_path):
    m = make_learner(tmp_path, losses=('ampd',)).model.eval()
    assert set(m.student.heads) == {'ampd'} and m.recon is None
    x = torch.rand(2, 1, CROP, CROP, CROP)
    guide = m.guide([x])
    pred = m(x, guide['cell_mask'])
    m.loss(pred, guide)
    tt = float(m.teacher_temp())
    ce = -(F.softmax(guide['t_ampd'] / tt, -1) * F.log_softmax(pred['s_ampd'] / 0.1, -1)).sum(-1)  # (b, cells)
    w = guide['cell_mask'].float()
    ref = ((ce * w).sum(1) / w.sum(1)).mean()
    torch.testing.assert_close(m.terms['ampd'], ref)
    assert set(m.terms) == {'ampd'}


def test_patch_dropout_zeroes_an_exact_share_of_the_teachers_patches(tmp_path):
    learn = make_learner(tmp_path, patch_drop=0.25)
    assert any(isinstance(c, NoisyTeacher) for c in learn.cbs)
    seen = {}
    def hook(mod, args):  # returns None: the arguments stay as they are
        seen.setdefault('mask', args[1])
        seen.setdefault('fill', args[2])

    h = learn.model.teacher.encoder.register_forward_pre_hook(hook)
    quiet_fit(learn, 1)
    h.remove()
    mask = seen['mask']
    assert mask.dtype == torch.bool and mask.shape == (4, 16, 16, 16)  # 2 views x bs 2 on the patch grid
    assert mask.flatten(1).sum(1).tolist() == [int(0.25 * 16 ** 3)] * 4
    assert seen['fill'] == 'zero'  # the paper: dropped patch tokens are set to 0
    # and the encoder does set them to zero (the mask token is another option)
    enc = learn.model.teacher.encoder
    x = torch.rand(1, 1, CROP, CROP, CROP)
    t = enc._apply_mask(enc.patch_embed(x), mask[:1], 'zero')[0]  # (d, h, w, c)
    assert t[mask[0]].abs().max() == 0 and t[~mask[0]].abs().max() > 0  # dropped: zero; kept: untouched
    plain = make_learner(tmp_path, noisy_teacher=False)
    assert not any(isinstance(c, NoisyTeacher) for c in plain.cbs)


def test_last_layer_frozen_in_the_first_epoch_only(tmp_path):
    learn = make_learner(tmp_path, freeze_last_layer=1, head='mlp')  # DINO's head: layers before the last one
    last = lambda: [p.detach().clone() for p in learn.model.student.last_layers()]  # noqa: E731
    start = last()
    mlp0 = [p.detach().clone() for h in learn.model.student.heads.values() for p in h.mlp.parameters()]
    quiet_fit(learn, 1)
    assert all(torch.equal(a, b) for a, b in zip(start, last()))
    mlp1 = [p for h in learn.model.student.heads.values() for p in h.mlp.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(mlp0, mlp1)), 'the rest of the heads trains in epoch 0'
    quiet_fit(learn, 2)  # a new fit: epoch 0 frozen again, epoch 1 trains the last layer
    assert any(not torch.equal(a, b) for a, b in zip(start, last()))


# ---------------------------------------------------------------- checkpoints and resume


@pytest.mark.slow
@pytest.mark.parametrize('schedule', ['fit_warmup_cosine', 'fit_one_cycle'])  # the paper's, and fastai's
def test_killed_run_resumes_with_the_same_losses(tmp_path, schedule):
    def quiet_fit(learn, n, **kw):
        with learn.no_bar(), learn.no_logging():
            getattr(learn, schedule)(n, **kw)
    set_seed(0)
    full, rf = make_learner(tmp_path / 'full'), LossLog()
    quiet_fit(full, 3, cbs=[rf])
    set_seed(0)
    part, rp = make_learner(tmp_path / 'part'), LossLog(stop=2)
    quiet_fit(part, 3, cbs=[rp])
    ck = load_checkpoint(tmp_path / 'part' / 'models' / 'checkpoint.pth')
    assert ck['epoch'] == 1 and ck['format'] == CHECKPOINT_FORMAT
    set_seed(1234)  # a fresh process would start from another random state: the checkpoint restores it
    again, ra = make_learner(tmp_path / 'part'), LossLog()
    start = again.resume(tmp_path / 'part' / 'models' / 'checkpoint.pth')
    assert start == 2
    quiet_fit(again, 3, cbs=[ra], start_epoch=start)
    assert len(rf.losses) == 6
    torch.testing.assert_close(torch.tensor(rp.losses + ra.losses), torch.tensor(rf.losses), rtol=1e-5, atol=1e-6)
    a, b = full.model.state_dict(), again.model.state_dict()
    for k in a:  # student, teacher, heads, centres and step
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert int(b['step']) == 6
    rows = list(csv.DictReader(open(tmp_path / 'part' / 'pretrain_log.csv')))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    # the rows read back from the CSV have the types of the new row: an int epoch, float figures
    assert [r['epoch'] for r in again.pretrain_log] == [0, 1, 2]
    assert {type(v) for r in again.pretrain_log for k, v in r.items() if k != 'epoch'} == {float}
    assert again.pretrain_log[0]['amip'] == pytest.approx(float(rows[0]['amip']))


def test_checkpoint_is_atomic_and_loads_weights_only(tmp_path):
    learn = make_learner(tmp_path)
    quiet_fit(learn, 1)
    path = tmp_path / 'models' / 'checkpoint.pth'
    assert [p.name for p in path.parent.iterdir()] == ['checkpoint.pth']  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the permissions of any new file, not mkstemp's 0600
    ck = torch.load(path, weights_only=True)
    assert set(ck) >= {'model', 'opt', 'rng', 'epoch', 'config'}
    assert any(k.startswith('teacher.') for k in ck['model']) and 'distill.gitd.center' in ck['model']
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a kill mid-copy
    with pytest.raises(ValueError, match='checkpoint.pth'):
        load_checkpoint(path)


def test_resume_refuses_another_configuration(tmp_path):
    learn = make_learner(tmp_path)
    quiet_fit(learn, 1)
    other = make_learner(tmp_path, mask_ratio=0.5)
    with pytest.raises(ValueError, match='mask_ratio'):
        other.resume(tmp_path / 'models' / 'checkpoint.pth')
    # a checkpoint written before a field existed (here global_stage) resumes: the field counts as unset; one written
    # with AttMask's hints (the default before) is refused, naming the field
    from dagman_fast.checkpoint import atomic_save, load_checkpoint
    path = tmp_path / 'models' / 'checkpoint.pth'
    ck = load_checkpoint(path, map_location='cpu')
    del ck['config']['dagman']['global_stage']
    atomic_save(ck, tmp_path / 'old.pth')
    assert make_learner(tmp_path).resume(tmp_path / 'old.pth') == 1
    ck['config']['dagman']['hint_pool'] = 0.1
    atomic_save(ck, tmp_path / 'older.pth')
    with pytest.raises(ValueError, match='hint_pool'):
        make_learner(tmp_path).resume(tmp_path / 'older.pth')
    assert make_learner(tmp_path, hint_pool=0.1).resume(tmp_path / 'older.pth') == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    learn = make_learner(tmp_path)
    quiet_fit(learn, 1)
    path = tmp_path / 'models' / 'checkpoint.pth'
    good = path.read_bytes()

    class Poison(Callback):
        order = 25  # after the masking callback, before StopOnNaN's after_loss

        def before_batch(self):
            if self.epoch == 1:
                self.learn.xb = (self.xb[0] * float('nan'), *self.xb[1:])

    with pytest.raises(FloatingPointError, match=r'checkpoint.*checkpoint\.pth'):
        quiet_fit(learn, 2, cbs=[Poison()])
    assert path.read_bytes() != good  # epoch 0 of this fit was saved ...
    ck = load_checkpoint(path)
    assert ck['epoch'] == 0  # ... and nothing after the NaN
    assert all(torch.isfinite(v).all() for v in learn.model.state_dict().values() if v.is_floating_point())


# ---------------------------------------------------------------- export


def test_export_encoder_loads_weights_only_into_a_fresh_encoder_and_monai(tmp_path):
    learn = make_learner(tmp_path)
    quiet_fit(learn, 1)
    path = learn.export_encoder(tmp_path / 'enc.pth')
    raw = torch.load(path, weights_only=True)
    assert raw['config']['arch'] == 'swin' and (tmp_path / 'enc.json').exists()
    enc = load_encoder(path).eval()
    student = learn.model.student.encoder.eval()
    x = torch.rand(1, 1, CROP, CROP, CROP)
    for a, b in zip(enc.forward_features(x), student.forward_features(x)):
        torch.testing.assert_close(a, b)
    twin = MonaiSwinTransformer(**monai_swin_kwargs(enc.config))
    twin.load_state_dict(to_monai(enc), strict=True)
    # also from the checkpoint, and from a wrapped state dict with prefixes
    ck_enc = load_encoder(tmp_path / 'models' / 'checkpoint.pth')
    torch.testing.assert_close(ck_enc.state_dict()['mask_token'], student.state_dict()['mask_token'])
    wrapped = {f'module.student.encoder.{k}': v for k, v in raw['state_dict'].items()}
    assert load_encoder(wrapped, config=raw['config']).load_report == dict(missing=[], unexpected=[])


def test_load_encoder_reports_missing_and_unexpected(tmp_path):
    learn = make_learner(tmp_path)
    sd = dict(learn.model.student.encoder.state_dict())
    sd.pop('mask_token')
    sd['extra.weight'] = torch.zeros(1)
    cfg = learn.model.encoder_config
    with pytest.raises(ValueError, match='mask_token.*extra.weight'):
        load_encoder(sd, config=cfg)
    with pytest.warns(UserWarning, match='1 missing'):
        enc = load_encoder(sd, config=cfg, strict=False)
    assert enc.load_report == dict(missing=['mask_token'], unexpected=['extra.weight'])
    with pytest.raises(ValueError, match='config='):
        load_encoder(sd)


# ---------------------------------------------------------------- methods and options


@pytest.mark.parametrize('method', [m for m in METHODS if m != 'sa-mask-stage-4'])  # a mask at stage 4 of 32^3: one cell
def test_every_method_trains_a_step(tmp_path, method):
    encoder = ViTConfig(img_size=CROP, patch_size=8, embed_dim=24, depth=2, num_heads=2) if method == 'attmask' else None
    learn = make_learner(tmp_path, method=method, encoder=encoder)
    m = learn.model
    spec = METHODS[method]
    assert m.config.masking == spec.get('masking', 'attention')
    assert m.config.noisy_teacher == spec.get('noisy_teacher', True)
    assert m.config.losses == spec.get('losses', ('aitd', 'ampd', 'gitd', 'amip'))
    assert any(isinstance(c, NoisyTeacher) for c in learn.cbs) == m.config.noisy_teacher
    if 'sa_stage' in spec.get('encoder', {}):
        assert m.encoder_config.sa_stage == spec['encoder']['sa_stage']
    if 'mask_stage' in spec:  # sa-stage-k moves only the SA module; sa-mask-stage-k the mask grid with it
        assert m.cell_stage == spec['mask_stage']
    if 'gitd' in m.config.losses and not m.is_vit:  # GITD pools the stage the method names (smit: 3), else the last
        assert m.global_stage == spec.get('global_stage', len(m.encoder_config.depths))
    before = [p.clone() for p in m.student.parameters()]
    quiet_fit(learn, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.student.parameters()))
    assert all(math.isfinite(float(v)) for v in m.terms.values())


def test_bad_options_are_named(tmp_path):
    with pytest.raises(TypeError, match='mask_ratoi'):
        make_learner(tmp_path, mask_ratoi=0.5)
    with pytest.raises(ValueError, match='sa_stage'):
        make_learner(tmp_path, encoder=enc_cfg(sa_stage=None))  # the default losses need the SA [CLS]
    with pytest.raises(ValueError, match="Did you mean 'block'"):
        make_learner(tmp_path, masking='blocks')
    with pytest.raises(ValueError, match='CUDA'):  # bf16 runs on the CPU (tests/test_bf16.py); fp16 does not
        make_learner(tmp_path, amp='fp16')
    with pytest.raises(ValueError, match='method'):
        make_learner(tmp_path, method='dino')
    with pytest.raises(ValueError, match='mask_ratio'):
        DAGMaNConfig(mask_ratio=1.5)


def test_config_round_trips_through_json(tmp_path):
    import json
    cfg = DAGMaNConfig(masking='block', losses=('gitd', 'amip'), mask_ratio=0.6)
    assert DAGMaNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.losses == ('gitd', 'amip')


def test_log_and_step_timer(tmp_path):
    learn = make_learner(tmp_path)
    timer = StepTimer(warmup=0)
    quiet_fit(learn, 2, cbs=[timer])
    rows = list(csv.DictReader(open(tmp_path / 'pretrain_log.csv')))
    assert len(rows) == 2
    for k in ('train_loss', 'aitd', 'ampd', 'gitd', 'amip', 'mask_ratio', 'aitd_entropy', 'gitd_mean_entropy',
              'ampd_center_norm', 'sa_cls_dissimilarity', 'ema_momentum', 'teacher_temp', 'lr'):
        assert k in rows[0], k
    assert float(rows[0]['mask_ratio']) == pytest.approx(int(0.7 * 8) / 8)
    s = timer.summary()
    assert len(timer.steps) == 4 and s['teacher'] > 0 and s['student'] > 0 and s['ema'] > 0 and s['backward'] > 0
    assert 0 <= float(rows[1]['sa_cls_dissimilarity']) <= 1


def test_a_second_fit_continues_the_runs_ema_cosine(tmp_path):
    "A second fit extends the planned run: the momentum goes on along the longer run's cosine, not back to its start."
    learn = make_learner(tmp_path)
    seen, planned = [], []

    class Momenta(Callback):
        order = 50  # after EMATeacher

        def after_batch(self):
            if self.training:
                seen.append(self.learn.ema_momentum)
                planned.append(self.learn.model.host_planned)

    for _ in range(2):
        quiet_fit(learn, 1, cbs=[Momenta()])
    cb = next(c for c in learn.cbs if isinstance(c, EMATeacher))
    assert planned == [2, 2, 4, 4] and int(learn.model.step) == 4 and int(learn.model.planned_steps) == 4
    assert seen == pytest.approx([cb.momentum_at(0, 2), cb.momentum_at(1, 2), cb.momentum_at(2, 4), cb.momentum_at(3, 4)])
    assert seen[0] == pytest.approx(learn.model.config.ema_momentum) and seen[2] > seen[0] and all(m < 1 for m in seen)


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    learn = make_learner(tmp_path)
    quiet_fit(learn, 1)
    path = tmp_path / 'models' / 'checkpoint.pth'
    good = path.read_bytes()
    ck = next(c for c in learn.cbs if isinstance(c, DAGMaNCheckpoint))
    with torch.no_grad():
        next(learn.model.student.parameters()).fill_(float('nan'))
    with pytest.raises(FloatingPointError, match='not overwritten'):
        ck.save(1)
    assert path.read_bytes() == good


def test_lr_find_writes_no_checkpoint_and_keeps_a_pending_resume(tmp_path):
    learn = make_learner(tmp_path)
    quiet_fit(learn, 1)
    path = tmp_path / 'models' / 'checkpoint.pth'
    good, log = path.read_bytes(), (tmp_path / 'pretrain_log.csv').read_text()
    again = make_learner(tmp_path)
    again.resume(path)
    with again.no_bar(), again.no_logging():
        again.lr_find(num_it=4, show_plot=False)
    assert path.read_bytes() == good and (tmp_path / 'pretrain_log.csv').read_text() == log
    assert next(c for c in again.cbs if isinstance(c, DAGMaNCheckpoint)).pending is not None


def test_ct_loaders_and_learner_use_the_default_device(tmp_path):
    from fastai.torch_core import default_device

    from dagman_fast.data import ct_ssl_dls, synthetic_ct
    synthetic_ct(tmp_path / 'ct', n=2, size=40)
    dls = ct_ssl_dls(tmp_path / 'ct', crop=CROP, bs=1, cache_dir=tmp_path / 'cache', progress=False)
    assert torch.device(dls.device) == default_device()
    learn = dagman_learner(dls, encoder=enc_cfg(), path=tmp_path, **HEADS)
    quiet_fit(learn, 1)
    assert next(learn.model.parameters()).device.type == default_device().type


# ---------------------------------------------------------------- the paper's methods, baselines and ablations


def test_baselines_are_the_methods_they_are_named_after(tmp_path):
    for name in ('smit', 'ibot3d'):  # nothing in them needs a [CLS]: no SA module, no AITD
        m = make_learner(tmp_path, method=name).model
        assert m.student.encoder.sa is None and 'aitd' not in m.student.heads, name
        assert not m.config.noisy_teacher, name
    assert make_learner(tmp_path, method='smit').model.config.losses == ('ampd', 'gitd', 'amip')
    ibot = make_learner(tmp_path, method='ibot3d').model.config
    assert (ibot.masking, ibot.losses) == ('block', ('ampd', 'gitd'))  # no pixel reconstruction in iBOT
    mst = make_learner(tmp_path, method='mst').model
    assert mst.student.encoder.sa is not None and mst.config.masking == 'low' and mst.config.losses == ('aitd', 'amip')
    vit = ViTConfig(img_size=CROP, patch_size=8, embed_dim=24, depth=2, num_heads=2)
    att = make_learner(tmp_path, method='attmask', encoder=vit).model
    assert att.is_vit and att.config.losses == ('aitd', 'ampd') and att.config.masking == 'attention'
    assert att.config.hint_ratio > 0 and not att.config.noisy_teacher


def test_ablation_presets(tmp_path):
    dag = make_learner(tmp_path).model.config
    sa = make_learner(tmp_path, method='sa-only').model.config
    nt = make_learner(tmp_path, method='nt-only').model
    smit = make_learner(tmp_path, method='smit').model
    assert (sa.masking, sa.noisy_teacher) == ('attention', False)
    # nt-only is SMIT's setting with the noisy teacher: no SA module, random masking, SMIT's losses and pooling
    assert (nt.config.masking, nt.config.noisy_teacher, nt.encoder_config.sa_stage) == ('random', True, None)
    differ = {f for f in DAGMaNConfig.__dataclass_fields__ if getattr(nt.config, f) != getattr(smit.config, f)}
    assert differ == {'noisy_teacher'} and nt.encoder_config == smit.encoder_config
    assert smit.global_stage == 3 and smit.student.heads['gitd'] is not None
    for k in (1, 2, 3, 4):  # only the SA module moves; the mask grid (and AMPD) stays on stage 3
        m = make_learner(tmp_path, method=f'sa-stage-{k}').model
        assert m.encoder_config.sa_stage == k and m.cell_stage == 3
        g = m.guide([torch.rand(1, 1, CROP, CROP, CROP)])
        assert g['attn'].shape[1] == (16 // 2 ** k) ** 3 and g['cell_mask'].shape == (1, 8)
    for k in (1, 2):  # both moved together: the presets' meaning before
        m = make_learner(tmp_path, method=f'sa-mask-stage-{k}').model
        assert m.encoder_config.sa_stage == k and m.cell_stage == k
    with pytest.raises(ValueError, match='masks no cell'):  # stage 4 of a 32^3 crop is a single cell
        make_learner(tmp_path, method='sa-mask-stage-4')
    for t in ('aitd', 'ampd', 'gitd', 'amip'):
        c = make_learner(tmp_path, method=f'no-{t}').model.config
        assert c.losses == tuple(n for n in dag.losses if n != t) and c.loss_weights == dag.loss_weights


def test_sa_attention_resampled_to_the_mask_grid():
    "Finer SA grid: each cell gets the sum of its SA tokens; coarser: each SA token's value on its cells."
    from dagman_fast.model import DAGMaNModel
    a = torch.rand(2, 3, 4 ** 3)
    cells = DAGMaNModel._attention_on_cells(a, (4, 4, 4), (2, 2, 2))
    grid = a.reshape(2, 3, 4, 4, 4)
    by_hand = torch.stack([grid[..., i:i + 2, j:j + 2, k:k + 2].sum((-3, -2, -1))
                           for i in (0, 2) for j in (0, 2) for k in (0, 2)], -1)
    torch.testing.assert_close(cells, by_hand)
    coarse = torch.rand(2, 3, 8)
    up = DAGMaNModel._attention_on_cells(coarse, (2, 2, 2), (4, 4, 4)).reshape(2, 3, 4, 4, 4)
    for i, j, k in ((0, 0, 0), (3, 1, 2), (2, 3, 3)):
        assert torch.equal(up[..., i, j, k], coarse.reshape(2, 3, 2, 2, 2)[..., i // 2, j // 2, k // 2])
    assert DAGMaNModel._attention_on_cells(a, (4, 4, 4), (4, 4, 4)) is a


def test_encoder_fields_are_options_of_dagman_learner(tmp_path):
    m = make_learner(tmp_path, sa_stage=2, drop_path_rate=0.0).model
    assert (m.encoder_config.sa_stage, m.encoder_config.drop_path_rate, m.cell_stage) == (2, 0.0, 2)
    with pytest.raises(TypeError, match='SwinConfig fields'):
        make_learner(tmp_path, sa_stag=2)


class GuideLog(Callback):
    "The student's cell mask of every batch, by phase (training or not)."
    order = AttentionGuidedMasking.order + 1

    def before_fit(self):
        self.masks = {True: [], False: []}

    def before_batch(self):
        self.masks[self.training].append(self.xb[-1].clone())


def test_validation_batches_get_a_clean_teacher_and_the_same_masks_every_epoch(tmp_path):
    seen = []
    learn = make_learner(tmp_path, masking='random')
    enc = learn.model.teacher.encoder
    h = enc.register_forward_pre_hook(lambda mod, args: seen.append((learn.training, args[1])))
    log = GuideLog()
    quiet_fit(learn, 2, cbs=[log])
    h.remove()
    assert all(drop is not None for training, drop in seen if training)
    assert all(drop is None for training, drop in seen if not training), 'patch dropout on a validation batch'
    valid = log.masks[False]
    assert len(valid) == 2 and torch.equal(valid[0], valid[1])  # one validation batch per epoch, same mask
    train = log.masks[True]
    assert not all(torch.equal(train[0], t) for t in train[1:])  # training masks are drawn afresh
    # asked for, validation batches are noisy too
    seen.clear()
    noisy, log = make_learner(tmp_path, masking='random', valid_noise=True), GuideLog()
    noisy.model.teacher.encoder.register_forward_pre_hook(lambda mod, args: seen.append((noisy.training, args[1])))
    quiet_fit(noisy, 2, cbs=[log])
    assert all(drop is not None for _, drop in seen)
    assert not torch.equal(log.masks[False][0], log.masks[False][1])


class HyperLog(Callback):
    order = 100

    def before_fit(self):
        self.rows = []

    def before_step(self):
        h = self.opt.hypers[-1]
        self.rows.append((h['lr'], h['mom'], h['sqr_mom']))


@pytest.mark.slow
def test_fit_warmup_cosine_is_the_papers_schedule(tmp_path):
    learn, log = make_learner(tmp_path), HyperLog()
    n_epoch, lr, warm = 10, 1e-3, 2  # 2 steps an epoch: 20 steps, 4 of warm-up
    with learn.no_bar(), learn.no_logging():
        learn.fit_warmup_cosine(n_epoch, lr, warmup=warm, cbs=[log])
    lrs, moms, sqr = zip(*log.rows)
    total = len(lrs)
    assert total == 20 and set(moms) == {0.9} and set(sqr) == {0.999}  # constant betas
    for i, got in enumerate(lrs):  # fastai evaluates the schedule at i / total
        p = i / total
        want = lr * p / 0.2 if p < 0.2 else 1e-6 + (lr - 1e-6) * (1 + math.cos(math.pi * (p - 0.2) / 0.8)) / 2
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), i
    assert max(lrs) == pytest.approx(lr, rel=0.05) and lrs.index(max(lrs)) in (3, 4)
    with pytest.raises(ValueError, match='warmup'):
        learn.fit_warmup_cosine(4, warmup=4)



def test_collapse_warnings_name_the_kind_of_collapse(tmp_path):
    from dagman_fast.callbacks import PretrainLog, collapse_kinds
    learn = make_learner(tmp_path)
    log = next(c for c in learn.cbs if isinstance(c, PretrainLog))
    k = math.log(HEADS['out_dim'])

    def check(step=30, **row):
        learn.model.plan(step, 100)
        log._warned = False
        base = {f'{n}_{s}': 0.6 * k for n in ('aitd', 'ampd', 'gitd') for s in ('entropy', 'mean_entropy')}
        base.update({f'{n}_{w}_cos': 0.5 for n in ('aitd', 'ampd', 'gitd') for w in 'st'})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            log._check_collapse({'step': step, **base, **row})
        return [str(w.message) for w in caught]

    assert check() == []  # a healthy run
    assert 'gitd: uniform' in check(gitd_entropy=0.999 * k)[0] and 'near uniform' in check(gitd_entropy=0.999 * k)[0]
    assert 'aitd: one prototype' in check(aitd_entropy=0.2, aitd_mean_entropy=0.3)[0]
    msg = check(ampd_t_cos=0.99)[0]
    assert 'ampd: identical features' in msg and 'step 30' in msg
    assert check(step=20, gitd_entropy=0.999 * k) == []  # before a quarter of the planned run: no verdict yet
    assert collapse_kinds({'aitd_entropy': 0.999 * k, 'aitd_mean_entropy': 0.1, 'aitd_s_cos': 0.97}, ['aitd'],
                          HEADS['out_dim']) == {'aitd': ['uniform', 'one prototype', 'identical features']}


def test_attention_stats_log_adds_per_stage_columns_every_n_epochs(tmp_path):
    from dagman_fast.analysis import AttentionStatsLog, attention_stats, plot_pretrain_log, stage_columns
    learn = make_learner(tmp_path)
    seen = []

    class FirstView(Callback):  # what AttentionStatsLog keeps: the first view of the first training batch
        def before_batch(self):
            if self.training and not seen:
                seen.append(self.xb[0][:2].clone())

    quiet_fit(learn, 3, cbs=[AttentionStatsLog(every=2, n=2), FirstView()])
    rows = list(csv.DictReader(open(tmp_path / 'pretrain_log.csv')))
    assert [bool(r.get('attn_dist_stage1')) for r in rows] == [False, True, True]  # epoch 2, and the last
    # the figures are those of the teacher at the end, on those images
    ref = stage_columns(attention_stats(learn.model.teacher.encoder, seen[0]).per_stage())
    assert {'attn_dist_sa', 'attn_ent_var_stage2'} <= set(ref)
    for k, v in ref.items():
        assert float(rows[-1][k]) == pytest.approx(v, rel=1e-4), k
    fig = plot_pretrain_log(tmp_path / 'pretrain_log.csv', tmp_path / 'log.png')
    assert len(fig.axes) == 9 and (tmp_path / 'log.png').exists()  # attention panels beside the six, one twin axis
    assert 'masked reconstruction (L1) and validation loss' in [ax.get_title() for ax in fig.axes]
    no_valid = [{k: v for k, v in r.items() if k != 'valid_loss'} for r in rows]  # a run without a validation split
    titles = [ax.get_title() for ax in plot_pretrain_log(no_valid).axes]
    assert 'masked reconstruction (L1)' in titles and not any('validation' in t for t in titles)
    twin = fig.axes[-1]  # the SA dissimilarity (about 0.002) on its own axis, not beside the mask ratio (0.6)
    assert [ln.get_label() for ln in twin.lines] == ['sa_cls_dissimilarity']
    mask_ax = next(ax for ax in fig.axes if ax.get_ylabel() == 'mask ratio')
    assert [ln.get_label() for ln in mask_ax.lines] == ['mask_ratio']
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)  # whole epochs only
    with pytest.raises(ValueError, match='every >= 1'):
        AttentionStatsLog(every=0)


# ---------------------------------------------------------------- against collapse: options, monitors, schedules


def test_span_parses_epochs_shares_and_steps():
    from dagman_fast.core import parse_span, span_steps
    assert parse_span(2) == ('epochs', 2.0) and parse_span('10%') == ('share', 0.1)
    assert parse_span('300 steps') == ('steps', 300.0) and parse_span('40steps') == ('steps', 40.0)
    assert span_steps(2, 5, 100) == 10 and span_steps('10%', 5, 100) == 10 and span_steps('7 steps', 5, 100) == 7
    for bad in ('ten', '150%', -1, True, '3 epochs'):
        with pytest.raises(ValueError, match='freeze_last_layer'):
            parse_span(bad, 'freeze_last_layer')
    with pytest.raises(ValueError, match='teacher_temp_warmup'):
        DAGMaNConfig(teacher_temp_warmup='abc')


def test_the_last_layer_stays_frozen_for_its_share_of_the_run_also_across_a_resume(tmp_path):
    learn = make_learner(tmp_path, freeze_last_layer='50%')
    last = learn.model.student.last_layers()
    seen = []

    class Moved(Callback):
        order = 50

        def before_batch(self):
            if self.training:
                self._w = [p.detach().clone() for p in last]

        def after_batch(self):
            if self.training:
                seen.append(any(not torch.equal(a, p) for a, p in zip(self._w, last)))

    quiet_fit(learn, 2, cbs=[Moved()])  # 4 steps: frozen for the first 2
    assert seen == [False, False, True, True]
    again = make_learner(tmp_path / 'again', freeze_last_layer='50%')
    start = again.resume(tmp_path / 'models' / 'checkpoint.pth')  # epoch 1 done: 4 of a 4-step run
    seen.clear()
    last = again.model.student.last_layers()
    quiet_fit(again, 3, cbs=[Moved()], start_epoch=start)  # a 6-step run resumed at step 4: not frozen again
    assert seen == [True, True]


def test_input_norm_standardises_each_view_for_both_encoders(tmp_path):
    m = make_learner(tmp_path, input_norm='volume').model.eval()
    x = torch.rand(2, 1, CROP, CROP, CROP) * 0.3 + 0.2
    z = (x - x.mean((1, 2, 3, 4), keepdim=True)) / x.std((1, 2, 3, 4), keepdim=True)
    pred = m(x)
    ref = m.student.encoder(z)
    torch.testing.assert_close(pred['s_gitd'], m.student.heads['gitd'](ref.features[-1].mean((2, 3, 4))))
    torch.testing.assert_close(pred['images'], x)  # the reconstruction target stays the view
    guide = m.guide([x])
    torch.testing.assert_close(guide['tf_gitd'], m.teacher.encoder(z).features[-1].mean((2, 3, 4)))


def test_ibot_style_masking_leaves_a_share_of_views_whole_and_jitters_the_ratio(tmp_path):
    m = make_learner(tmp_path, masking='random', mask_ratio=0.5, mask_ratio_jitter=0.25, mask_prob=0.5).model.eval()
    x = torch.rand(64, 1, CROP, CROP, CROP)
    counts, whole = set(), 0
    for seed in range(6):
        cm = m.guide([x], generator=torch.Generator().manual_seed(seed))['cell_mask']
        per = cm.sum(1)
        whole += int((per == 0).sum())
        counts |= set(per[per > 0].tolist())
    assert 0.3 < whole / (6 * 64) < 0.7  # about half the views unmasked
    assert len(counts) > 1 and min(counts) >= 2 and max(counts) <= 6  # 8 cells, ratio in [0.25, 0.75]
    assert m.masker.ratio == 0.5  # restored after each batch
    with pytest.raises(ValueError, match='mask_ratio_jitter'):
        DAGMaNConfig(mask_ratio=0.7, mask_ratio_jitter=0.4)


def test_koleo_joins_the_total_loss_with_its_weight(tmp_path):
    from dagman_fast.losses import koleo_loss
    m = make_learner(tmp_path, koleo_weight=0.5, noisy_teacher=False).model.train()
    x = torch.rand(4, 1, CROP, CROP, CROP)
    guide = m.guide([x, x.flip(2)])
    pred = m(x, x.flip(2), cell_mask=guide['cell_mask'])
    total = m.loss(pred, guide)
    ref = sum(koleo_loss(f) for n in ('aitd', 'gitd') for f in pred[f'sf_{n}'].chunk(2))
    assert float(m.terms['koleo']) == pytest.approx(float(ref.detach()), rel=1e-5)
    others = sum(m.config.loss_weights[n] * v for n, v in m.terms.items() if n != 'koleo')
    assert float(total.detach()) == pytest.approx(float(others + 0.5 * m.terms['koleo']), rel=1e-5)
    assert {'aitd_s_cos', 'aitd_t_cos', 'gitd_s_std', 'ampd_t_std_rel'} <= set(m.monitors)


@pytest.mark.parametrize('head', ['linear', 'mlp'])
def test_teacher_heads_batchnorm_uses_the_batch_statistics(tmp_path, head):
    m = make_learner(tmp_path, head_bn=True, head=head).model.eval()
    bns = [b for b in m.teacher.heads.modules() if isinstance(b, TokenBatchNorm)]
    assert bns and not m.teacher.training
    gitd = m.teacher.heads['gitd']
    f = torch.randn(6, gitd.last_layer.in_features if head == 'linear' else gitd.mlp[0].in_features) * 1e-2 + 5
    # the linear head's BatchNorm on its input; the MLP's after its first Linear; on this batch's statistics, in eval
    h = gitd.norm(f) if head == 'linear' else gitd.mlp[:2](f)
    torch.testing.assert_close(h.mean(0), torch.zeros_like(h[0]), atol=1e-3, rtol=0)
    assert not any('running' in k for k in m.state_dict())  # nothing a NaN batch could poison
    one = torch.randn(1, bns[0].bn.num_features)
    torch.testing.assert_close(bns[0](one), one)  # one sample: no batch statistics, passed unchanged


def test_the_log_carries_the_collapse_monitors_per_epoch_and_per_step(tmp_path):
    learn = make_learner(tmp_path)
    log = next(c for c in learn.cbs if type(c).__name__ == 'PretrainLog')
    log.step_every = 1
    quiet_fit(learn, 2)
    rows = list(csv.DictReader(open(tmp_path / 'pretrain_log.csv')))
    steps = list(csv.DictReader(open(tmp_path / 'pretrain_log_steps.csv')))
    for n in ('aitd', 'ampd', 'gitd'):
        for k in ('entropy', 'mean_entropy', 'gap', 's_cos', 't_cos', 's_std', 't_std', 's_std_rel'):
            assert f'{n}_{k}' in rows[0] and f'{n}_{k}' in steps[0], f'{n}_{k}'
    assert [int(r['step']) for r in steps] == [1, 2, 3, 4]
    # the epoch's figures are the means of its steps
    for k in ('gitd_s_cos', 'aitd_gap', 'amip'):
        assert float(rows[1][k]) == pytest.approx((float(steps[2][k]) + float(steps[3][k])) / 2, rel=1e-5)
    r = rows[0]
    assert float(r['gitd_gap']) == pytest.approx(float(r['gitd_mean_entropy']) - float(r['gitd_entropy']), abs=1e-5)
    assert -1 <= float(r['gitd_t_cos']) <= 1 and float(r['gitd_s_std']) > 0


def test_dino_lr_rule_and_weight_decay_schedule(tmp_path):
    learn = dagman_learner(make_dls(), encoder=enc_cfg(), path=tmp_path, lr=1e-3, checkpoint=None, log=None,
                           scale_lr=True, wd=0.04, wd_final=0.4, **HEADS)
    assert learn.lr == pytest.approx(1e-3 * 2 / 256)  # batch of 2 on one process
    wds = []

    class WD(Callback):
        def after_batch(self):
            if self.training:
                wds.append(self.opt.hypers[0]['wd'])

    with learn.no_bar(), learn.no_logging():
        learn.fit_warmup_cosine(2, cbs=[WD()])
    assert wds[0] == pytest.approx(0.04) and wds[-1] > 0.3 and wds == sorted(wds)


def test_distillation_weights_ramp_up_over_their_warmup(tmp_path):
    m = make_learner(tmp_path, distill_warmup='50%', noisy_teacher=False).model.train()
    x = torch.rand(2, 1, CROP, CROP, CROP)
    for step, ramp in ((0, 0.0), (5, 0.5), (10, 1.0), (15, 1.0)):
        m.plan(step, 20)
        assert m.distill_ramp() == pytest.approx(ramp)
        guide = m.guide([x, x.flip(3)])
        total = m.loss(m(x, x.flip(3), cell_mask=guide['cell_mask']), guide)
        w = dict(m.config.loss_weights, koleo=m.config.koleo_weight)
        ref = sum(w[n] * v * (ramp if n != 'amip' else 1) for n, v in m.terms.items())
        assert float(total.detach()) == pytest.approx(float(ref), rel=1e-5)


def test_tensorboard_gets_the_per_step_monitors(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from dagman_fast.train_utils import tensorboard_callback
    learn = make_learner(tmp_path)
    log = next(c for c in learn.cbs if type(c).__name__ == 'PretrainLog')
    log.step_every = 2
    learn.add_cb(tensorboard_callback(tmp_path / 'tb'))
    quiet_fit(learn, 2)
    acc = EventAccumulator(str(tmp_path / 'tb'), size_guidance={'scalars': 0})
    acc.Reload()
    steps = list(csv.DictReader(open(tmp_path / 'pretrain_log_steps.csv')))
    for k in ('gitd_s_cos', 'aitd_gap', 'ampd_t_std'):
        points = acc.Scalars(f'steps/{k}')
        assert [p.step for p in points] == [2, 4], k
        assert [p.value for p in points] == pytest.approx([float(r[k]) for r in steps], rel=1e-5), k


def test_koleo_uses_the_views_the_student_sees_whole_when_some_are(tmp_path):
    from dagman_fast.losses import koleo_loss
    m = make_learner(tmp_path, koleo_weight=0.5, noisy_teacher=False, masking='random', mask_prob=0.5).model.train()
    x = torch.rand(8, 1, CROP, CROP, CROP)
    guide = m.guide([x, x.flip(2)], generator=torch.Generator().manual_seed(0))
    whole = ~guide['cell_mask'].any(-1)
    assert 0 < int(whole.sum()) < 16
    pred = m(x, x.flip(2), cell_mask=guide['cell_mask'])
    m.loss(pred, guide)
    ref = sum(koleo_loss(f[w]) for n in ('aitd', 'gitd') for f, w in zip(pred[f'sf_{n}'].chunk(2), whole.chunk(2))
              if int(w.sum()) >= 2)
    assert float(m.terms['koleo']) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_every_loss_combination_has_a_preset():
    "Each of the 15 non-empty subsets of the four losses is a method by its contents, the others as DAGMaN."
    import itertools

    from dagman_fast.model import LOSSES, METHOD_HELP
    combos = [c for r in range(1, 5) for c in itertools.combinations(LOSSES, r)]
    for c in combos:
        name = 'losses-' + '-'.join(c)
        assert METHODS[name] == dict(losses=c) and name in METHOD_HELP, name
        assert DAGMaNConfig(**METHODS[name]).losses == c
    assert len([m for m in METHODS if m.startswith('losses-')]) == len(combos) == 15
