"""Classification fine-tuning: frozen parameter sets, linear probing, encoder loading, metrics, MONAI hand-off."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from sklearn.metrics import confusion_matrix, recall_score, roc_auc_score

from dagman_fast.classify import cls_learner, cls_splitter, ClsModel, evaluate_classifier, sensitivity, specificity
from dagman_fast.encoder_configs import SwinConfig, ViTConfig
from dagman_fast.monai_interop import to_monai
from dagman_fast.swin import build_encoder

CFG = SwinConfig(img_size=32, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), sa_stage=3, sa_num_heads=4,
                 drop_path_rate=0.1)


def make_dls(n=8, size=32, classes=2):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.rand(n, 1, size, size, size, generator=g) * 0.2 + y.view(-1, 1, 1, 1, 1).float() * 0.5
    ds = torch.utils.data.TensorDataset(x, y)
    dls = DataLoaders(DataLoader(ds, bs=4, shuffle=True, drop_last=True), DataLoader(ds, bs=4))
    dls.c = classes
    return dls


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return [not torch.equal(a, b) for a, b in zip(before, module.parameters())]


class Phases(Callback):
    "Which parameters require gradients at the start of every fit (fine_tune runs two)."
    def __init__(self):
        self.phases = []

    def before_fit(self):
        m = self.learn.model
        self.phases.append(({p.requires_grad for p in m.encoder.parameters()},
                            {p.requires_grad for p in m.head.parameters()}))


def test_fine_tune_freezes_the_encoder_then_trains_all_with_spread_lrs(tmp_path):
    learn = cls_learner(make_dls(), encoder=build_encoder(CFG), path=tmp_path)
    phases = Phases()
    learn.add_cb(phases)
    enc0 = snapshot(learn.model.encoder)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(1, base_lr=1e-3, freeze_epochs=1)
    assert phases.phases == [({False}, {True}), ({True}, {True})]  # frozen epoch, then everything
    assert any(changed(enc0, learn.model.encoder))
    lrs = [h['lr'] for h in learn.opt.hypers]
    assert len(lrs) == 5 and lrs == sorted(lrs) and lrs[0] < lrs[-1] / 10  # stage 1 slowest, head fastest


def test_frozen_phase_leaves_the_encoder_and_its_norms_untouched(tmp_path):
    enc = build_encoder(CFG)
    learn = cls_learner(make_dls(), encoder=enc, path=tmp_path)
    assert learn.model.encoder is not enc  # a copy: the caller's encoder (e.g. across k folds) stays as it was
    learn.freeze()
    learn.model.train()
    assert not learn.model.encoder.training  # frozen features without drop path, as in validation
    learn.unfreeze()
    learn.model.train()
    assert learn.model.encoder.training
    learn.freeze()
    enc0, head0 = snapshot(learn.model.encoder), snapshot(learn.model.head)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-3)
    assert not any(changed(enc0, learn.model.encoder))  # LayerNorms included (train_bn=False)
    assert all(changed(head0, learn.model.head))


def test_linear_probe_never_trains_the_encoder(tmp_path):
    learn = cls_learner(make_dls(), encoder=build_encoder(CFG), linear_probe=True, path=tmp_path)
    assert cls_splitter(learn.model)[0] == []
    enc0 = snapshot(learn.model.encoder)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(1, freeze_epochs=1)  # even fine_tune's unfreeze cannot reach it
    assert not any(changed(enc0, learn.model.encoder))
    learn.model.train()
    assert not learn.model.encoder.training  # no drop path in a fixed feature extractor


def test_loads_an_exported_encoder_and_a_checkpoint(tmp_path):
    from fastai.torch_core import set_seed

    from tests.test_learner import make_learner, quiet_fit  # a tiny DAGMaN run
    set_seed(0)
    pre = make_learner(tmp_path / 'pre')
    quiet_fit(pre, 1)
    path = pre.export_encoder(tmp_path / 'enc.pth')
    student = pre.model.student.encoder.state_dict()
    for source in (path, tmp_path / 'pre' / 'models' / 'checkpoint.pth', pre):
        learn = cls_learner(make_dls(), encoder=source, path=tmp_path)
        got = learn.model.encoder.state_dict()
        assert all(torch.equal(got[k], student[k]) for k in student), source
    assert learn.model.encoder is not pre.model.student.encoder  # a copy: fine-tuning leaves the run alone


def test_padding_and_pools(tmp_path):
    enc = build_encoder(CFG).eval()
    model = ClsModel(enc, 3).eval()
    x = torch.rand(2, 1, 28, 28, 28)
    ref = enc.forward_features(F.pad(x, [2, 2, 2, 2, 2, 2]))[-1].mean((2, 3, 4))
    torch.testing.assert_close(model.features(x), ref)
    cls = ClsModel(enc, 3, pool='cls').eval()
    assert cls(x).shape == (2, 3) and cls.head[-1].in_features == 12 * 8
    no_sa = SwinConfig(img_size=32, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), sa_stage=None)
    with pytest.raises(ValueError, match='sa_stage'):
        ClsModel(build_encoder(no_sa), 2, pool='cls')
    vit = build_encoder(ViTConfig(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=2))
    learn = cls_learner(make_dls(), encoder=vit, pool='cls', path=tmp_path)
    assert len(cls_splitter(learn.model)) == 5 and learn.model(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2)


@pytest.mark.parametrize('classes', [2, 3])
def test_sensitivity_and_specificity_match_sklearn(classes):
    rng = np.random.default_rng(classes)
    y, p = rng.integers(0, classes, 200), rng.integers(0, classes, 200)
    cm = confusion_matrix(y, p, labels=list(range(classes)))
    spec = [(cm.sum() - cm[i].sum() - cm[:, i].sum() + cm[i, i]) / (cm.sum() - cm[i].sum()) for i in range(classes)]
    if classes == 2:
        assert sensitivity(y, p) == pytest.approx(recall_score(y, p))
        assert specificity(y, p) == pytest.approx(recall_score(y, p, pos_label=0))
    else:
        assert sensitivity(y, p) == pytest.approx(recall_score(y, p, average='macro'))
        assert specificity(y, p) == pytest.approx(np.mean(spec))


def test_metrics_and_bad_input(tmp_path):
    learn = cls_learner(make_dls(classes=3), encoder=build_encoder(CFG), path=tmp_path)
    names = [m.name for m in learn.metrics]
    assert names == ['auc', 'accuracy', 'sensitivity', 'specificity']
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-4)
        vals = list(learn.validate()[1:])
    res, probs, labels = evaluate_classifier(learn.model, learn.dls.valid)  # an independent pass with sklearn
    assert vals == pytest.approx([res['auc'], res['accuracy'], res['sensitivity'], res['specificity']], abs=1e-6)
    assert res['auc'] == pytest.approx(roc_auc_score(labels, probs, multi_class='ovr'))
    # a validation set without class 2 (a fold, a few-shot split): metrics still computed, over the classes present
    x, y = learn.dls.valid.dataset.tensors
    keep = y < 2
    small = DataLoaders(learn.dls.train, DataLoader(torch.utils.data.TensorDataset(x[keep], y[keep]), bs=4))
    with learn.no_bar(), learn.no_logging():
        got = learn.validate(dl=small.valid)[1:]
    assert all(np.isfinite(got))
    dls = make_dls()
    dls.c = None
    with pytest.raises(ValueError, match='n_out'):
        cls_learner(dls, encoder=build_encoder(CFG))
    with pytest.raises(TypeError, match='encoder must be'):
        cls_learner(make_dls(), encoder=42)


def test_monai_swinunetr_takes_the_encoder_strictly():
    from monai.networks.nets import SwinUNETR
    cfg = SwinConfig(img_size=32, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), sa_stage=None)
    enc = build_encoder(cfg).eval()
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=cfg.depths, num_heads=cfg.num_heads,
                    window_size=4, patch_norm=cfg.patch_norm, downsample='mergingv2').eval()
    net.swinViT.load_state_dict(to_monai(enc), strict=True)
    x = torch.rand(1, 1, 32, 32, 32)
    for a, b in zip(net.swinViT(x, normalize=True), enc.forward_features(x)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert net(torch.rand(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)  # 32^3 has a 1-voxel bottleneck


# ---------------------------------------------------------------- segmentation


def seg_dls(n=4, size=64, classes=3):
    "Volumes with a bright box (class 1) and a darker sphere (class 2) on noise."
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, size, generator=g) * 0.1
    y = torch.zeros(n, size, size, size, dtype=torch.long)
    y[:, 8:24, 8:24, 8:24] = 1
    zz, yy, xx = torch.meshgrid(*(torch.arange(size),) * 3, indexing='ij')
    y[:, ((zz - 44) ** 2 + (yy - 44) ** 2 + (xx - 44) ** 2) < 100] = 2
    x[:, 0][y == 1] += 0.8
    x[:, 0][y == 2] += 0.4
    ds = torch.utils.data.TensorDataset(x, y)
    dls = DataLoaders(DataLoader(ds, bs=2, shuffle=True), DataLoader(ds, bs=2))
    dls.c = classes
    return dls


def test_seg_model_equals_monai_swinunetr_with_the_same_weights():
    from monai.networks.nets import SwinUNETR

    from dagman_fast.segment import SegModel
    cfg = SwinConfig(img_size=64, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), sa_stage=None)
    model = SegModel(build_encoder(cfg), 3).eval()
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=cfg.depths, num_heads=cfg.num_heads,
                    window_size=4, patch_norm=cfg.patch_norm, downsample='mergingv2').eval()
    net.swinViT.load_state_dict(to_monai(model.encoder), strict=True)
    decoder = {k: v for k, v in model.state_dict().items() if not k.startswith('encoder.')}
    missing, unexpected = net.load_state_dict(decoder, strict=False)
    assert not unexpected and all(k.startswith('swinViT.') for k in missing)  # same decoder names and shapes
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_seg_learner_fine_tunes_and_the_dice_rises(tmp_path):
    from monai.metrics import compute_dice

    from dagman_fast.segment import predict_volume, seg_learner, seg_splitter
    from fastai.torch_core import set_seed
    set_seed(0)
    dls = seg_dls()
    learn = seg_learner(dls, encoder=build_encoder(SwinConfig(img_size=64, embed_dim=12, depths=(2, 2, 2, 2),
                                                              num_heads=(1, 2, 2, 4), sa_stage=3, sa_num_heads=4)),
                        path=tmp_path)
    assert len(seg_splitter(learn.model)) == 5
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(6, 3e-3)
    dice = learn.recorder.values[-1][-1]
    x, y = dls.valid.one_batch()
    pred = predict_volume(learn, x[0], roi_size=64, overlap=0.5)
    with pytest.raises(ValueError, match='roi_size'):
        predict_volume(learn, x[0], roi_size=32)
    assert pred.shape == y[0].shape
    ref = compute_dice(F.one_hot(pred[None], 3).movedim(-1, 1), F.one_hot(y[:1], 3).movedim(-1, 1),
                       include_background=False).nanmean().item()
    assert dice > 0.3 and ref > 0.3, (dice, ref)  # from ~0 for random weights


def test_seg_learner_bad_input():
    from dagman_fast.segment import seg_learner
    vit = build_encoder(ViTConfig(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2))
    with pytest.raises(TypeError, match='SwinEncoder'):
        seg_learner(seg_dls(size=32), encoder=vit)
    dls = seg_dls(size=32)
    dls.c = 1
    with pytest.raises(ValueError, match='n_classes'):
        seg_learner(dls, encoder=build_encoder(CFG))


# ---------------------------------------------------------------- few-shot and cross-validation


def test_few_shot_subsets_are_stratified_and_seeded():
    from dagman_fast.classify import few_shot_indices
    labels = np.array([0] * 80 + [1] * 20 + [2] * 8)
    for frac in (0.25, 0.5):
        idx = few_shot_indices(labels, frac, seed=3)
        counts = np.bincount(labels[idx], minlength=3)
        assert abs(len(idx) - frac * len(labels)) <= 1
        assert np.all(np.abs(counts - frac * np.bincount(labels)) <= 1), counts
        assert np.array_equal(idx, few_shot_indices(labels, frac, seed=3))
        assert not np.array_equal(idx, few_shot_indices(labels, frac, seed=4))
    with pytest.raises(ValueError, match='fraction'):
        few_shot_indices(labels, 0)
    rare = np.array([0] * 98 + [1] * 2)
    assert np.bincount(rare[few_shot_indices(rare, 0.01)], minlength=2).tolist() == [1, 1]  # no class dropped


def test_stratified_folds_partition_and_subset_loaders():
    from dagman_fast.classify import stratified_folds, subset_dls, summarize
    dls = make_dls(n=12, classes=2)
    labels = dls.train.dataset.tensors[1].numpy()
    folds = stratified_folds(labels, k=3, seed=0)
    assert len(folds) == 3
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(12))
    for tr, va in folds:
        assert not set(tr) & set(va) and np.bincount(labels[va]).tolist() == [2, 2]
    sub = subset_dls(dls, *folds[0], bs=2)
    assert len(sub.train.dataset) == 8 and len(sub.valid.dataset) == 4 and sub.c == 2
    s = summarize([dict(auc=0.7, acc=0.6), dict(auc=0.9, acc=0.8)])
    assert s['auc']['mean'] == pytest.approx(0.8) and s['auc']['std'] == pytest.approx(np.std([0.7, 0.9], ddof=1))


def test_classifier_round_trip_and_evaluation(tmp_path):
    from sklearn.metrics import roc_auc_score

    from dagman_fast.classify import evaluate_classifier, load_classifier, save_classifier
    dls = make_dls(classes=3)
    model = ClsModel(build_encoder(CFG), 3, pool='cls').eval()
    path = save_classifier(model, tmp_path / 'c.pth')
    again = load_classifier(path)
    x = torch.rand(2, 1, 32, 32, 32)
    torch.testing.assert_close(again(x), model(x))
    res, probs, labels = evaluate_classifier(again, dls.valid)
    assert res['n'] == 8 and probs.shape == (8, 3)
    assert res['auc'] == pytest.approx(roc_auc_score(labels, probs, multi_class='ovr'))
    assert res['accuracy'] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    torch.save({'state_dict': {}}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='not a classifier'):
        load_classifier(tmp_path / 'other.pth')


@pytest.mark.parametrize('seed', [0, 1, 7])
def test_cv_splits_stratified_disjoint_and_the_test_set_untouched(seed):
    "On labels drawn here (three unbalanced classes): the paper's split, checked property by property."
    import numpy as np

    from dagman_fast.classify import cv_splits
    rng = np.random.default_rng(100 + seed)
    labels = rng.choice(3, size=157, p=[0.6, 0.3, 0.1])
    test, folds = cv_splits(labels, folds=3, test=0.2, seed=seed)
    n_test = int(round(0.2 * len(labels)))
    assert abs(len(test) - n_test) <= 1
    share = np.bincount(labels, minlength=3) / len(labels)
    assert np.abs(np.bincount(labels[test], minlength=3) / len(test) - share).max() < 0.05  # stratified
    dev = np.setdiff1d(np.arange(len(labels)), test)
    valids = np.concatenate([va for _, va in folds])
    assert sorted(valids.tolist()) == dev.tolist()  # each development item validated exactly once
    for tr, va in folds:
        assert not set(tr) & set(va) and not (set(tr) | set(va)) & set(test)  # disjoint; the test set untouched
        assert sorted(np.concatenate([tr, va]).tolist()) == dev.tolist()
        expected = np.bincount(labels[dev], minlength=3) / 3
        assert np.abs(np.bincount(labels[va], minlength=3) - expected).max() <= 1  # stratified folds
    again = cv_splits(labels, folds=3, test=0.2, seed=seed)
    assert np.array_equal(again[0], test) and all(np.array_equal(a[1], b[1]) for a, b in zip(again[1], folds))
    official = np.arange(120, 157)  # a given test split is kept as it is
    t2, f2 = cv_splits(labels, folds=3, test=official, seed=seed)
    assert np.array_equal(t2, official) and max(max(tr.max(), va.max()) for tr, va in f2) < 120
    with pytest.raises(ValueError, match='at least 5 development items'):
        cv_splits(np.array([0] * 20 + [1] * 4), folds=5, test=0.1)
    with pytest.raises(ValueError, match='folds'):
        cv_splits(labels, folds=1)
