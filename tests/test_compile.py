"""Regional compilation (`compile_blocks`, issue 28): the compiled encoder gives the eager encoder's maps, loss and
gradients on the CPU (inductor's C++ backend), and the learners compile only when asked."""
import copy

import pytest
import torch

from dagman_fast.classify import cls_learner
from dagman_fast.swin import PatchMerging, SwinBlock, ViTBlock, build_encoder, compile_blocks
from test_learner import make_learner


def _blocks(enc):
    return [m for m in enc.modules() if isinstance(m, (SwinBlock, ViTBlock, PatchMerging))]


def test_compile_blocks_wraps_every_block_and_keeps_the_weights():
    enc = build_encoder('swin-tiny', img_size=32, attn_impl='reference')
    names = list(enc.state_dict())
    compile_blocks(enc)
    assert enc.compiled and all(b._compiled_call_impl is not None for b in _blocks(enc))
    assert list(enc.state_dict()) == names  # no `_orig_mod.` prefixes: checkpoints stay interchangeable
    assert not any(b.mlp.recompute_gelu for b in _blocks(enc) if hasattr(b, 'mlp'))


@pytest.mark.slow
def test_compiled_encoder_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_encoder('swin-tiny', img_size=32, embed_dim=12, num_heads=(1, 2, 2, 4), drop_path_rate=0.0,
                          sa_stage=3).train()
    compiled = compile_blocks(copy.deepcopy(eager))
    x = torch.randn(2, 1, 32, 32, 32)
    mask = torch.rand(2, 16, 16, 16) < 0.5
    outs = {}
    for name, enc in (('eager', eager), ('compiled', compiled)):
        out = enc(x, mask)
        loss = sum(f.pow(2).mean() for f in out.features) + out.tokens.pow(2).mean() + out.attn.sum()
        loss.backward()
        outs[name] = (out, loss, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    (eo, el, eg), (co, cl, cg) = outs['eager'], outs['compiled']
    torch.testing.assert_close(cl, el, rtol=1e-5, atol=1e-6)
    for a, b in zip(co.features, eo.features):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(co.attn, eo.attn, rtol=1e-4, atol=1e-6)
    assert cg.keys() == eg.keys()
    for n in eg:
        torch.testing.assert_close(cg[n], eg[n], rtol=1e-3, atol=1e-5, msg=lambda m: f'{n}: {m}')
    # the same eager-compiled pair without grad (the teacher's path): maps equal too
    with torch.no_grad():
        for a, b in zip(compiled.eval()(x).features, eager.eval()(x).features):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_learners_compile_only_when_asked(tmp_path):
    for flag in (False, True):
        m = make_learner(tmp_path, compile=flag).model
        for enc in (m.student.encoder, m.teacher.encoder):
            assert all((b._compiled_call_impl is not None) == flag for b in _blocks(enc))
    probe = cls_learner(_cls_dls(), encoder=build_encoder('swin-tiny', img_size=32), n_out=2, compile=True,
                        path=tmp_path, augment=False, norm=False, class_weights=None)
    assert all(b._compiled_call_impl is not None for b in _blocks(probe.model.encoder))


def _cls_dls():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    items = [(torch.randn(1, 32, 32, 32), torch.tensor(i % 2)) for i in range(4)]
    return DataLoaders(DataLoader(items, bs=2), DataLoader(items, bs=2))


def test_compile_blocks_raises_dynamos_recompile_limit():
    import torch._dynamo.config as dynamo_config
    before = dynamo_config.recompile_limit
    try:
        dynamo_config.recompile_limit = 8
        compile_blocks(build_encoder('swin-tiny', img_size=32))
        assert dynamo_config.recompile_limit >= 64  # 4 stages x 2 shifts x grad/no grad x batch sizes share forward
    finally:
        dynamo_config.recompile_limit = before
