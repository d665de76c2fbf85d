"""Data-parallel runs for `tests/test_distributed.py`, launched by `torchrun --nproc_per_node N` (or plainly, as one
process). Each mode trains a tiny encoder on in-memory data through the library's learners and `learn.distrib_ctx()`,
then saves what the test compares, one file per rank, in the output folder:

    python tests/ddp_worker.py MODE OUT [--bs B]

- `step`: one optimiser step of DAGMaN with the masks and teacher patch dropouts fixed in advance per sample (the same
  draws whatever the number of processes): the student, teacher and centres after it.
- `draws`: two epochs with random masking; which samples each rank saw, and its masks and patch-dropout draws; then
  what `metrics` measures. `--epochs 1` stops after the first epoch's checkpoint, `--resume` continues one.
- `metrics`: the validation AUC and accuracy of a classifier (the same weights on every rank), and its feature
  standardisation's statistics computed from the training crops (shared out between the ranks).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import set_seed

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from dagman_fast.distributed import rank, setup_distributed, world_size  # noqa: E402
from dagman_fast.learner import dagman_learner  # noqa: E402
from dagman_fast.masking import random_mask  # noqa: E402
from dagman_fast.swin import SwinEncoder  # noqa: E402

N_SAMPLES, VIEWS, CROP = 8, 2, 32
TINY = dict(encoder=tiny_config(img_size=CROP, sa_stage=2), mask_stage=2, out_dim=64, head_hidden=32,
            head_bottleneck=16, checkpoint=None, log=None)


class Views(torch.utils.data.Dataset):
    "`N_SAMPLES` fixed pairs of views; with `tagged`, every voxel of sample i holds i / 100 (to see who got what)."

    def __init__(self, n: int = N_SAMPLES, tagged: bool = False, dtype=torch.float32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, VIEWS, 1, CROP, CROP, CROP, generator=g, dtype=dtype)
        if tagged:
            self.x = torch.arange(n).float().div(100).view(n, 1, 1, 1, 1, 1).expand_as(self.x).clone()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return tuple(self.x[i])


def views_dls(bs: int, tagged: bool = False, shuffle: bool = False, dtype=torch.float32) -> DataLoaders:
    dls = DataLoaders(DataLoader(Views(tagged=tagged, dtype=dtype), bs=bs, shuffle=shuffle),
                      DataLoader(Views(0), bs=bs), device='cpu')
    dls.n_inp = VIEWS
    return dls


def _samples(learn) -> torch.Tensor:
    "The dataset indices of this rank's batch: fastai's DistributedDL gives each rank a contiguous share, in order."
    b = learn.xb[0].shape[0]
    return torch.arange(b) + rank() * b


class FixedDraws(Callback):
    "Replaces the teacher's patch dropout (after `NoisyTeacher`) and the student's cell mask (after the masking)."
    order = 16

    def __init__(self, drops: torch.Tensor, masks: torch.Tensor):
        self.drops, self.masks = drops, masks  # (views, samples, ...) for every sample of the dataset

    def before_batch(self):
        idx = _samples(self.learn)
        self.learn.yb = ({'teacher_drop': torch.cat([self.drops[v, idx] for v in range(VIEWS)])},)
        self.learn.fixed_mask = torch.cat([self.masks[v, idx] for v in range(VIEWS)])


class FloatLoss(Callback):
    "fastai's Recorder keeps its smoothed loss in float32: it gets the float64 loss as float32 (the gradient stays)."

    def after_loss(self):
        self.learn.loss = self.loss.float()


class FixedMask(Callback):
    order = 21  # after AttentionGuidedMasking (20)

    def before_batch(self):
        m = self.learn.fixed_mask
        self.learn.xb = (*self.xb[:-1], m)
        self.learn.yb[0]['cell_mask'] = m


def step(out: Path, bs: int) -> None:
    "One step of DAGMaN; the samples, masks and dropouts depend on the sample only, not on the number of processes."
    set_seed(0)
    # exact equality with one process needs every reduction over the whole batch: the heads' BatchNorm is per process
    # on the CPU (SyncBatchNorm is CUDA's) and KoLeo's nearest neighbours are per process (as DINOv2's), so both off
    learn = dagman_learner(views_dls(bs, dtype=torch.float64), path=out, **TINY, head_bn=False, koleo_weight=0.0)
    m = learn.model.double()  # float64: summation order (one batch of 2b or two of b) then changes ~1e-14, not 1e-5
    grid = m.patch_grid((CROP,) * 3)
    n_cells = m.cell_grid((CROP,) * 3)
    g = torch.Generator().manual_seed(2)
    drops = random_mask(VIEWS * N_SAMPLES, grid[0] * grid[1] * grid[2], 100, g).view(VIEWS, N_SAMPLES, *grid)
    n = n_cells[0] * n_cells[1] * n_cells[2]
    masks = random_mask(VIEWS * N_SAMPLES, n, int(0.7 * n), g).view(VIEWS, N_SAMPLES, n)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with learn.distrib_ctx():
        learn.fit(1, 1e-3, cbs=[FixedDraws(drops, masks), FixedMask(), FloatLoss()])
    torch.save(dict(before=before, after=m.state_dict(), world=world_size()), out / f'rank{rank()}.pt')


class Record(Callback):
    "Keeps, per training step, the sample tags of the batch, its cell mask and the teacher's dropped patches."
    order = 25

    def before_fit(self):
        self.steps = []

    def before_batch(self):
        if self.training:
            tags = (self.xb[0].flatten(1)[:, 0] * 100).round().long()
            self.steps.append(dict(epoch=self.epoch, samples=tags.tolist(), mask=self.yb[0]['cell_mask'].clone(),
                                   drop=self.yb[0]['teacher_drop'].clone()))


def draws(out: Path, bs: int, resume: Path | None = None, epochs: int = 2) -> None:
    """Two epochs of random masking on tagged samples, shuffled: who saw which sample, and the random draws. With
    `resume`: the checkpoint of such a run (written by `--epochs 1`), continued for the second epoch only."""
    set_seed(0)
    learn = dagman_learner(views_dls(bs, tagged=True, shuffle=True), path=out, masking='random',
                           **{**TINY, 'checkpoint': 'checkpoint.pth'})
    start = learn.resume(resume) if resume else 0
    rec = Record()
    with learn.distrib_ctx():
        learn.fit(2, 1e-3, cbs=[rec] + ([CancelAfter(epochs)] if epochs < 2 else []), start_epoch=start)
    results, norm = _metrics(out, bs) if resume is None and epochs == 2 else ({}, None)
    torch.save(dict(steps=rec.steps, world=world_size(), results=results, norm=norm), out / f'rank{rank()}.pt')


class CancelAfter(Callback):
    "Stops the fit after `n` epochs, once the checkpoint of the last one is written (order after DAGMaNCheckpoint)."
    order = 100

    def __init__(self, n: int):
        self.n = n

    def after_epoch(self):
        if self.epoch + 1 == self.n:
            raise CancelFitException


def _metrics(out: Path, bs: int) -> tuple[dict, torch.Tensor]:
    """Validation metrics of one classifier (rank 0's weights on every rank) on 7 labelled crops, and the Dice of a
    one-layer segmenter on 7 label maps: 7 samples on 2 ranks make fastai repeat one to even out the shares. Also the
    classifier's `FeatureNorm` statistics, which `FeatureStats` computes from the training crops shared out between
    the ranks."""
    from dagman_fast.distributed import DistributedLearner
    from dagman_fast.classify import cls_learner
    from dagman_fast.segment import DiceScore
    set_seed(0)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(7, 1, CROP, CROP, CROP, generator=g)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 1])
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds, bs=bs), DataLoader(ds, bs=bs), device='cpu')
    dls.c = 2
    learn = cls_learner(dls, encoder=SwinEncoder(tiny_config(img_size=CROP)), path=out)
    torch.nn.init.normal_(learn.model.head[-1].weight, std=10.0)  # a head whose scores differ between the crops
    with learn.distrib_ctx():
        res = learn.validate()
    names = ['valid_loss'] + [m.name for m in learn.metrics]
    set_seed(1)  # the segmenter's weights: the same whether a data-parallel fit reseeded the ranks above or not
    maps = (torch.rand(7, 8, 8, 8, generator=g) * 3).long()  # 3 classes, some absent from some maps
    seg = list(zip(torch.rand(7, 1, 8, 8, 8, generator=g), maps))
    sdls = DataLoaders(DataLoader(seg, bs=bs), DataLoader(seg, bs=bs), device='cpu')
    slearn = DistributedLearner(sdls, torch.nn.Conv3d(1, 3, 3, padding=1), loss_func=torch.nn.CrossEntropyLoss(),
                                metrics=[DiceScore(3)], path=out)
    with slearn.distrib_ctx():
        dice = slearn.validate()[1]
    norm = learn.model.head[0]
    return ({**dict(zip(names, [float(r) for r in res])), 'dice': float(dice)},
            torch.stack([norm.running_mean, norm.running_var]))


def metrics(out: Path, bs: int) -> None:
    results, norm = _metrics(out, bs)
    torch.save(dict(results=results, norm=norm, world=world_size()), out / f'rank{rank()}.pt')


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('mode', choices=['step', 'draws', 'metrics'])
    p.add_argument('out', type=Path)
    p.add_argument('--bs', type=int, default=2)
    p.add_argument('--epochs', type=int, default=2, help='draws: stop after this many epochs (1 or 2)')
    p.add_argument('--resume', type=Path, default=None, help='draws: continue this checkpoint')
    p.add_argument('--local-centres', action='store_true',
                   help="negative control: each rank centres with its own batch mean (no all-reduce)")
    args = p.parse_args()
    if args.local_centres:
        import dagman_fast.losses
        dagman_fast.losses.all_mean = lambda t: t
    setup_distributed()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == 'draws':
        draws(args.out, args.bs, args.resume, args.epochs)
    else:
        dict(step=step, metrics=metrics)[args.mode](args.out, args.bs)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    from dagman_fast.distributed import exit_process
    exit_process(0)  # as the dagman command: DDP leaves gloo's threads running, and exit-time teardown can abort
