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

from dagman_fast.finetune import ClsLearner, balanced_class_weights, cls_learner, layer_decay_lrs
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


def test_recipe_schedule_groups_and_best_epoch(tmp_path):
    learn = _learner(tmp_path)
    assert isinstance(learn, ClsLearner)
    learn.freeze()  # the recipe trains every layer from the first step, whatever state the learner is in
    enc0 = {k: v.clone() for k, v in learn.model.encoder.state_dict().items()}
    lrs = StepLRs()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune_recipe(5, lr=1e-2, layer_decay=0.5, warmup=0.2, lr_min=1e-6, monitor='valid_loss', cbs=[lrs])
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
    assert len(losses) == 5 and losses[-1] > min(losses)  # (here the best epoch is not the last)
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
