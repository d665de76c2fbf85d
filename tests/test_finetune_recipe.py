"""`learn.fine_tune_recipe`: layer-wise learning-rate decay, warm-up then cosine, and the best validation epoch kept."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import set_seed

from dagman_fast.classify import balanced_class_weights, cls_learner
from dagman_fast.learner import FineTuneLearner
from dagman_fast.schedule import layer_decay_lrs
from dagman_fast.swin import SwinEncoder


def test_layer_decay_lrs():
    np.testing.assert_allclose(layer_decay_lrs(5, 1e-3, 0.5), [6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3])
    np.testing.assert_allclose(layer_decay_lrs(3, 2e-3, 1.0), [2e-3] * 3)
    with pytest.raises(ValueError, match='layer_decay'):
        layer_decay_lrs(5, 1e-3, 0.0)


class StepLRs(Callback):
    "The learning rate of every parameter group at every training step."
    order = 99

    def before_fit(self):
        self.lrs = []

    def before_step(self):
        self.lrs.append([h['lr'] for h in self.opt.hypers])


def _learner(tmp_path):
    set_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 32, 32, 32, generator=g)
    y = torch.tensor([0, 1] * 6)
    x[y == 1] += 0.3  # a signal to learn
    train, valid = list(zip(x[:8], y[:8])), list(zip(x[8:], y[8:]))
    dls = DataLoaders(DataLoader(train, bs=4, shuffle=True), DataLoader(valid, bs=4), device='cpu')
    dls.c = 2
    return cls_learner(dls, encoder=SwinEncoder(tiny_config(img_size=32)), path=tmp_path)


class Spoil(Callback):
    "Before the validation of epoch `epoch`, the head's weights made useless: that epoch cannot be the best."
    def __init__(self, epoch: int):
        self.at = epoch

    def after_train(self):
        if self.epoch == self.at:
            with torch.no_grad():
                self.learn.model.head[-1].weight.mul_(-50.0)


def test_recipe_schedule_groups_and_best_epoch(tmp_path):
    learn = _learner(tmp_path)
    assert isinstance(learn, FineTuneLearner)
    learn.freeze()  # the recipe trains every layer from the first step, whatever state the learner is in
    enc0 = {k: v.clone() for k, v in learn.model.encoder.state_dict().items()}
    lrs = StepLRs()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune_recipe(5, lr=1e-2, layer_decay=0.5, pct_start=0.2, lr_min=1e-6, monitor='valid_loss',
                               cbs=[lrs, Spoil(4)])
    steps = np.array(lrs.lrs)  # (10 steps, 5 groups: four Swin stages and the head)
    assert steps.shape == (10, 5)
    assert np.all(steps[0] == 0)  # the warm-up starts from 0
    np.testing.assert_allclose(steps[1:] / steps[1:, -1:], np.tile([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1], (9, 1)), rtol=1e-6)
    head = steps[:, -1]
    assert head[0] < head[1] and head.argmax() == 2 and np.all(np.diff(head[2:]) < 0)  # warm-up, then down
    assert head.max() == pytest.approx(1e-2, rel=0.05) and head[-1] < 1e-3
    moved = [k for k, v in learn.model.encoder.state_dict().items() if not torch.equal(v, enc0[k])]
    assert any(k.startswith('stages.0.') for k in moved)  # the first stage trained too
    # the weights at the end are those of the epoch with the lowest validation loss, not of the last epoch
    losses = [v[1] for v in learn.recorder.values]
    assert len(losses) == 5 and losses[-1] > min(losses)  # (the last epoch spoilt on purpose: not the best)
    assert learn.validate()[0] == pytest.approx(min(losses), rel=1e-5)
    assert (tmp_path / 'models' / 'best.pth').exists()


def test_balanced_class_weights_make_each_class_count_alike(tmp_path):
    w = balanced_class_weights([0, 0, 0, 1], 2)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 4 / 2]))  # n / (classes * count): 3 zeros, 1 one
    torch.testing.assert_close(balanced_class_weights([0, 2, 2], 3), torch.tensor([1.0, 0.0, 0.5]))  # absent: 0
    learn = _learner(tmp_path)  # 8 training labels: 4 and 4, so 'balanced' is all ones
    skewed = cls_learner(learn.dls, encoder=learn.model.encoder, class_weights=[0.25, 0.75], path=tmp_path)
    balanced = cls_learner(learn.dls, encoder=learn.model.encoder, class_weights='balanced', path=tmp_path)
    torch.testing.assert_close(balanced.loss_func.func.weight, torch.ones(2))
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 1])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction='none')
    w = torch.tensor([0.25, 0.75])[y]
    torch.testing.assert_close(skewed.loss_func(logits, y), (ce * w).sum() / w.sum())  # weighted mean, by hand
    with pytest.raises(ValueError, match='one weight per class'):
        cls_learner(learn.dls, encoder=learn.model.encoder, class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match='class_weights'):
        cls_learner(learn.dls, encoder=learn.model.encoder, class_weights='inverse')


def test_set_drop_path_grows_with_depth_and_only_acts_in_training():
    from dagman_fast.swin import set_drop_path
    from dagman_fast.swin import DropPath
    torch.manual_seed(0)
    enc = SwinEncoder(tiny_config(img_size=32))
    blocks = [b for st in enc.stages for b in st.blocks]
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in blocks)  # built without drop path
    x = torch.rand(2, 1, 32, 32, 32)
    enc.eval()
    ref = enc.forward_features(x)[-1]
    assert set_drop_path(enc, 0.3) is enc and enc.config.drop_path_rate == 0.3
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, len(blocks)), rtol=1e-6)  # 0 (Identity) at the first block
    torch.testing.assert_close(enc.forward_features(x)[-1], ref)  # eval: no drop path
    enc.train()
    torch.manual_seed(1)
    a = enc.forward_features(x)[-1]
    torch.manual_seed(2)
    assert not torch.allclose(a, enc.forward_features(x)[-1])  # training: random depth per sample
    set_drop_path(enc, 0.0)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in blocks)
    torch.testing.assert_close(enc.forward_features(x)[-1], ref)  # removed again (the blocks have no dropout)
    with pytest.raises(ValueError, match='drop_path'):
        set_drop_path(enc, 1.0)


class Inputs(Callback):
    "The model's inputs of every training and validation batch, after the callbacks before it (order 50)."
    order = 50

    def before_fit(self):
        self.seen_train, self.seen_valid = [], []

    def before_batch(self):
        (self.seen_train if self.training else self.seen_valid).append(self.xb[0].clone())


def test_augment3d_changes_training_batches_only_and_repeats_with_the_seed(tmp_path):
    from dagman_fast.classify import Augment3D, cls_augment
    runs = []
    for _ in range(2):
        learn = _learner(tmp_path)  # set_seed(0) inside
        assert any(isinstance(cb, Augment3D) for cb in learn.cbs)  # on by default
        seen, plain = Inputs(), _learner(tmp_path)
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 0.0, cbs=[seen])  # lr 0: the inputs are all that changes
        runs.append(seen)
    valid_x = torch.cat([x for x, _ in plain.dls.valid])
    torch.testing.assert_close(torch.cat(runs[0].seen_valid), valid_x)  # validation is never augmented
    originals = [x for x, _ in plain.dls.train.dataset]
    changed = [not any(torch.equal(x, o) for o in originals) for x in torch.cat(runs[0].seen_train)]
    assert len(changed) == 8 and sum(changed) >= 7  # six draws of p=0.5 each: a volume stays as it was 1 time in 64
    for a, b in zip(runs[0].seen_train, runs[1].seen_train):
        torch.testing.assert_close(a, b)  # set_seed repeats MONAI's draws
    # a deterministic transform against a hand-made reference: flips along the three axes, nothing else
    flip_all = Augment3D(cls_augment(flip=1.0, prob=0.0))
    learn = cls_learner(plain.dls, encoder=plain.model.encoder, augment=flip_all.tfm, path=tmp_path)
    seen = Inputs()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 0.0, cbs=[seen])
    x = torch.cat(seen.seen_train)
    flipped = {float(v.flip(1, 2, 3).sum()): v.flip(1, 2, 3) for v, _ in plain.dls.train.dataset}
    for v in x:
        ref = min(flipped.values(), key=lambda r: float((r - v).abs().max()))
        torch.testing.assert_close(v, ref)
    assert cls_learner(plain.dls, encoder=plain.model.encoder, augment=False).cbs.filter(
        lambda cb: isinstance(cb, Augment3D)) == []


def test_batch_augment_against_hand_made_references():
    "BatchAugment3D: flips exact, no-op when off, a 90-degree turn against torch.rot90, draws bounded and per volume."
    from dagman_fast.classify import BatchAugment3D
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 5, 6, 7, generator=g)
    torch.testing.assert_close(BatchAugment3D(flip=0.0, prob=0.0)(x), x)  # nothing drawn: the volumes themselves
    torch.testing.assert_close(BatchAugment3D(flip=1.0, prob=0.0)(x), x.flip(2, 3, 4))  # all three axes, exactly
    # a quarter turn in the (h, w) plane about the centre: torch.rot90, voxel for voxel
    cube = torch.rand(2, 1, 4, 6, 6, generator=g)
    quarter = BatchAugment3D(flip=0.0, prob=0.0)
    turn = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    turn[:, 1:3, 1:3] = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    turn[:, 1:3, 3] = 2.5 - turn[:, 1:3, 1:3] @ torch.tensor([2.5, 2.5], dtype=torch.float64)
    quarter.matrices = lambda b, shape, generator=None: turn
    torch.testing.assert_close(quarter(cube), torch.rot90(cube, 1, (3, 4)), rtol=0, atol=1e-5)
    # the draws: rotation times scale, about the centre, within the ranges, a different one per volume
    aug = BatchAugment3D(flip=0.0, prob=1.0, rotate=15.0, scale=0.1, shift=2.0)
    theta = aug.matrices(500, (9, 9, 9), torch.Generator().manual_seed(1))
    a = theta[:, :3, :3]
    s = torch.linalg.svdvals(a)
    assert s.min() >= 0.9 - 1e-9 and s.max() <= 1.1 + 1e-9 and (torch.linalg.det(a) > 0).all()
    centre = torch.full((3,), 4.0, dtype=torch.float64)
    moved = a @ centre + theta[:, :3, 3] - centre  # where the centre lands: the shift alone
    assert moved.abs().max() <= 2.0 + 1e-9 and moved.abs().max() > 1.5
    r = a / s.prod(-1).pow(1 / 3).view(-1, 1, 1)  # near enough a rotation: its angle stays below ~15 deg on each axis
    angle = torch.rad2deg(torch.arccos(((r.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert angle.max() < 15 * 3 ** 0.5 + 3 and angle.std() > 1
    half = BatchAugment3D(prob=0.5).matrices(2000, (4, 4, 4), torch.Generator().manual_seed(2))
    assert abs((half != torch.eye(4, dtype=half.dtype)).any(-1).any(-1).double().mean() - 0.5) < 0.05
    # the flips: each axis about half the time, independently; voxel (0, 0, 0) of arange(8) tells which axes turned
    corner = BatchAugment3D(flip=0.5, prob=0.0)(torch.arange(8.0).view(1, 1, 2, 2, 2).repeat(4000, 1, 1, 1, 1),
                                                 torch.Generator().manual_seed(2))[:, 0, 0, 0, 0].long()
    bits = torch.stack([(corner >> k) & 1 for k in (2, 1, 0)], 1).double()  # flipped along d, h, w
    assert ((bits.mean(0) - 0.5).abs() < 0.05).all() and (torch.corrcoef(bits.T) - torch.eye(3)).abs().max() < 0.06
    # the intensity: out = x * a + b per volume, |a - 1| <= 0.1, |b| <= 0.1, and the same draws for the same seed
    jitter = BatchAugment3D(flip=0.0, prob=1.0, rotate=0.0, scale=0.0, shift=0.0, intensity=0.1)
    out = jitter(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, jitter(x, torch.Generator().manual_seed(3)))
    for v, o in zip(x.flatten(1), out.flatten(1)):
        fit = torch.linalg.lstsq(torch.stack([v, torch.ones_like(v)], 1), o[:, None]).solution.flatten()
        assert abs(fit[0] - 1) <= 0.1 + 1e-4 and abs(fit[1]) <= 0.1 + 1e-4
        torch.testing.assert_close(o, v * fit[0] + fit[1], rtol=0, atol=1e-5)


def test_cls_learner_defaults_are_the_recipe(tmp_path):
    from dagman_fast.classify import Augment3D
    from dagman_fast.swin import DropPath
    learn = _learner(tmp_path)
    torch.testing.assert_close(learn.loss_func.func.weight, torch.ones(2))  # 'balanced' (4 and 4 here)
    assert len(learn.cbs.filter(lambda cb: isinstance(cb, Augment3D))) == 1
    last = learn.model.encoder.stages[-1].blocks[-1].drop_path
    assert isinstance(last, DropPath) and last.drop_prob == pytest.approx(0.1)
    plain = cls_learner(learn.dls, encoder=learn.model.encoder, class_weights=None, augment=False, drop_path=None)
    assert plain.loss_func.func.weight is None and not plain.cbs.filter(lambda cb: isinstance(cb, Augment3D))
    assert plain.model.encoder.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.1)  # kept, not reset


class Counted(DataLoader):
    "A DataLoader that counts how often it is iterated."
    iterations = 0

    def __iter__(self):
        Counted.iterations += 1
        return super().__iter__()


def test_recipe_never_looks_at_the_test_split_and_keeps_the_validation_best(tmp_path):
    from dagman_fast.classify import evaluate_classifier
    learn = _learner(tmp_path)
    x = torch.rand(6, 1, 32, 32, 32)
    learn.dls.test = Counted(list(zip(x, torch.tensor([0, 1] * 3))), bs=3)
    Counted.iterations = 0
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune_recipe(4, lr=1e-2)  # monitor: the first metric, the validation AUC
    assert Counted.iterations == 0  # training and the choice of epoch never read the test split
    auc = [v[2] for v in learn.recorder.values]  # (train_loss, valid_loss, auc, ...)
    assert learn.monitor == 'auc' and learn.best_epoch == int(np.argmax(auc))  # fastai keeps the first of ties
    assert learn.best_value == pytest.approx(max(auc))
    assert learn.validate()[1] == pytest.approx(max(auc))  # the weights now are the kept epoch's
    evaluate_classifier(learn.model, learn.dls.test)
    assert Counted.iterations == 1  # scored once, at the end


@pytest.mark.slow
def test_cli_finetune_uses_the_recipe_by_default(tmp_path, capsys):
    import json

    from dagman_fast.cli import main
    from tests.test_cli import _fake_medmnist, assert_fails
    _fake_medmnist(tmp_path)
    data = ['--medmnist', 'adrenalmnist3d', '--root', str(tmp_path), '--bs', '4', '--preset', 'swin-tiny']
    out = tmp_path / 'ft'
    assert main(['finetune', *data, '--epochs', '3', '--out', str(out)]) == 0
    res = json.loads((out / 'results.json').read_text())
    assert res['config']['schedule'] == 'recipe' and res['epochs_run'] == 3 and res['kept_epoch'] in (0, 1, 2)
    assert res['valid']['auc'] == pytest.approx(res['kept_by']['auc'], abs=1e-6)  # the validation-chosen weights
    fastai = tmp_path / 'fa'
    assert main(['finetune', *data, '--schedule', 'fastai', '--no-augment', '--class-weights', 'none', '--epochs', '1',
                 '--out', str(fastai)]) == 0
    assert 'kept_epoch' not in json.loads((fastai / 'results.json').read_text())  # fastai's last epoch
    x = str(tmp_path / 'x')
    assert_fails(capsys, ['finetune', *data, '--freeze-epochs', '2', '--out', x], '--freeze-epochs: not an option of '
                                                                                  '--schedule recipe')
    assert_fails(capsys, ['finetune', *data, '--schedule', 'fastai', '--layer-decay', '0.5', '--out', x],
                 '--layer-decay: not an option of --schedule fastai')
    assert_fails(capsys, ['finetune', *data, '--drop-path', '1', '--out', x], '--drop-path')
    assert_fails(capsys, ['finetune', '--seg', 'a', 'b', '--labels', '1', '--no-augment', '--out', x],
                 '--no-augment: not an option of segmentation')


def test_feature_norm_standardises_pooled_features_and_round_trips(tmp_path):
    from dagman_fast.classify import ClsModel, FeatureNorm, load_classifier, save_classifier
    g = torch.Generator().manual_seed(0)
    # features as a collapsed encoder gives them: a large offset shared by every image, a thousandth that differs
    f = 0.5 + 1e-3 * torch.randn(16, 8, generator=g)
    fn = FeatureNorm(8).train()
    z = fn(f)
    ref = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + fn.eps)  # by hand
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-4)
    assert fn(f[:1]).shape == (1, 8)  # a training batch of one uses the running statistics instead of failing
    assert not any(p.requires_grad for p in fn.parameters())  # no affine: the head's linear layer scales
    torch.manual_seed(0)
    model = ClsModel(SwinEncoder(tiny_config(img_size=32)), 2)
    assert isinstance(model.head[0], FeatureNorm) and isinstance(model.head[-1], torch.nn.Linear)
    assert not isinstance(ClsModel(SwinEncoder(tiny_config(img_size=32)), 2, norm=False).head[0], FeatureNorm)
    model.train()(torch.rand(4, 1, 32, 32, 32))  # running statistics move off 0 / 1
    model.eval()
    x = torch.rand(3, 1, 32, 32, 32)
    save_classifier(model, tmp_path / 'c.pth')
    again = load_classifier(tmp_path / 'c.pth')
    torch.testing.assert_close(again(x), model(x))  # the statistics are saved with the weights
    old = torch.load(tmp_path / 'c.pth', weights_only=True)  # a classifier saved before FeatureNorm: no 'norm'
    plain = ClsModel(SwinEncoder(tiny_config(img_size=32)), 2, norm=False)
    old.pop('norm')
    old['state_dict'] = {k: v for k, v in plain.state_dict().items()}
    torch.save(old, tmp_path / 'old.pth')
    assert not load_classifier(tmp_path / 'old.pth').norm


def test_feature_stats_recompute_the_norm_in_evaluation_mode(tmp_path):
    "After a fit with augmentation and drop path, FeatureNorm holds the eval-mode statistics of the training images."
    learn = _learner(tmp_path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    model = learn.model.eval()
    with torch.no_grad():
        plain = torch.utils.data.DataLoader(learn.dls.train.dataset, batch_size=3)  # in order, unaugmented
        f = torch.cat([model.features(x) for x, _ in plain])
    norm = model.head[0]
    torch.testing.assert_close(norm.running_mean, f.mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norm.running_var, f.var(0), rtol=1e-4, atol=1e-8)
