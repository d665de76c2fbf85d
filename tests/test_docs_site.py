"""The documentation site's converter (docs_site/build.py): links, anchors, outputs. The whole build and the browser
check run as CI steps (`.ci/run`), not here."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('docs_build', REPO / 'docs_site' / 'build.py')
docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs)


def test_show_doc_headings_get_nbdevs_anchors():
    md = '---\n\n### dagman_learner\n\ntext\n\n#### DAGMaNLearner.resume\n\n### not a name here\n'
    out = docs._anchored(md)
    assert '### dagman_learner {#dagman_learner}' in out
    assert '#### DAGMaNLearner.resume {#dagmanlearner-resume}' in out
    assert '### not a name here\n' in out
    doc = '```python\ndef f(x)\n```\n\n*First half of a wrapped*\nsentence of the docstring.\n'
    assert '```\n\nFirst half of a wrapped\nsentence' in docs._anchored(doc)  # one paragraph, not half in italics


def test_backticked_names_link_to_their_entries_outside_code():
    index = {'dagman_learner': 'api/learner.md#dagman_learner', 'ClsModel': 'api/classify.md#clsmodel'}
    md = ('Use `dagman_learner` and `ClsModel.features`, not `unknown`.\n\n```python\nx = `dagman_learner`\n```\n'
          'Already [`dagman_learner`](x.md).')
    out = docs.link_names(md, Path('tutorials/01_x.md'), index)
    assert '[`dagman_learner`](../api/learner.md#dagman_learner)' in out
    assert '[`ClsModel.features`](../api/classify.md#clsmodel)' in out  # a method: its class's entry
    assert '`unknown`' in out and '[`unknown`]' not in out
    assert 'x = `dagman_learner`' in out  # fenced code untouched
    assert '[`dagman_learner`](x.md)' in out and out.count('](../api/learner.md') == 1


def test_repository_links_become_site_pages_images_or_github():
    pages = {'nbs/tutorials/01_pretraining.ipynb': 'tutorials/01_pretraining.md', 'BENCHMARKS.md': 'benchmarks.md'}
    md = ('[a](nbs/tutorials/01_pretraining.ipynb) [b](BENCHMARKS.md#issue-14) ![c](docs/medmnist_few_shot.png) '
          '[d](bench/bench_medmnist.py) '
          '[e](https://docs.fast.ai)')
    out = docs.repo_page(md, pages)
    assert '[a](tutorials/01_pretraining.md)' in out and '[b](benchmarks.md#issue-14)' in out
    assert '![c](img/medmnist_few_shot.png)' in out and '[e](https://docs.fast.ai)' in out
    assert '[d](https://github.com/dagman-fast/dagman_fast/blob/main/bench/bench_medmnist.py)' in out


def _nb(tmp_path, outputs):
    cell = dict(cell_type='code', source='#| echo: false\nprint(1)', metadata={}, outputs=outputs, execution_count=1)
    raw = dict(cell_type='raw', source='---\ntitle: T\ndescription: D\n---\n', metadata={})
    p = tmp_path / 'n.ipynb'
    p.write_text(json.dumps(dict(cells=[raw, cell], metadata={}, nbformat=4, nbformat_minor=5)))
    return p


def test_outputs_render_and_errors_fail_the_build(tmp_path):
    png = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='
    outs = [dict(output_type='stream', name='stdout', text='epoch 1\r epoch 2\n'),
            dict(output_type='display_data', data={'image/png': png, 'text/plain': '<Figure>'}, metadata={})]
    title, md = docs.notebook_page(_nb(tmp_path, outs), Path('tutorials/n.md'), tmp_path / 'img')
    assert title == 'T' and md.startswith('# T\n\n> D')
    assert 'print(1)' not in md  # echo: false
    assert '```text\n epoch 2\n```' in md  # a carriage-returned line keeps its last state
    assert '![T figure 1](../img/n_1.png)' in md and (tmp_path / 'img' / 'n_1.png').read_bytes()[:4] == b'\x89PNG'
    bad = [dict(output_type='error', ename='ValueError', evalue='boom', traceback=[])]
    with pytest.raises(docs.BuildError, match='ValueError: boom'):
        docs.notebook_page(_nb(tmp_path, bad), Path('n.md'), tmp_path / 'img')
    warn = [dict(output_type='stream', name='stderr', text='x.py:1: UserWarning: careful\n')]
    with pytest.raises(docs.BuildError, match='warning'):
        docs.notebook_page(_nb(tmp_path, warn), Path('n.md'), tmp_path / 'img')


def test_a_link_to_a_missing_repository_file_fails_the_build():
    with pytest.raises(docs.BuildError, match="README.md: a link to 'BENCHMARK.md'"):
        docs.repo_page('see [the figures](BENCHMARK.md)', {'BENCHMARKS.md': 'benchmarks.md'}, 'README.md')


def test_include_and_output_directives(tmp_path):
    nb = _nb(tmp_path, [dict(output_type='stream', name='stdout', text='shown\n')])
    data = json.loads(nb.read_text())
    data['cells'][1]['source'] = '#| output: false\nx = 1'
    nb.write_text(json.dumps(data))
    md = docs.notebook_page(nb, Path('n.md'), tmp_path / 'img')[1]
    assert 'x = 1' in md and 'shown' not in md
    data['cells'][1]['source'] = '#| include: false\nx = 1'
    nb.write_text(json.dumps(data))
    md = docs.notebook_page(nb, Path('n.md'), tmp_path / 'img')[1]
    assert 'x = 1' not in md and 'shown' not in md


def test_signatures_are_clean():
    sig = ('def f(\n    a:Union[int, NoneType]=None, b:NoneType=None, c:typing.Optional[fastai.data.core.DataLoaders]=None,'
           ' # a `torch.Tensor`\n    d:str | None=None, e:Union[Callable, collections.abc.MutableSequence, NoneType]=None\n):')
    out = docs.clean_signature(sig)
    assert 'NoneType' not in out
    assert 'a:int | None=None, b=None, c:DataLoaders | None=None, # a `torch.Tensor`' in out  # comments as they are
    assert 'd:str | None=None, e:Callable | MutableSequence | None=None' in out


def test_args_sections_render_as_tables():
    doc = ('Make a learner.\n\nArgs:\n    dls: the data.\n    lr, wd: AdamW\'s, `a | b`\n        and more.\n'
           '    **cfg: any field.\n\nReturns:\n    the learner.\n\nExample: `f(dls)`.\n')
    out = docs.docstring_sections(doc)
    assert '| argument | description |' in out
    assert '| `dls` | the data. |' in out
    assert "| `lr`, `wd` | AdamW's, `a | b` and more. |" in out
    assert '| `**cfg` | any field. |' in out
    assert '**Returns:** the learner.' in out and 'Example: `f(dls)`.' in out and out.startswith('Make a learner.')


def test_benchmarks_mentions_link_to_the_page():
    md = ('see `BENCHMARKS.md`, or BENCHMARKS.md#issue-14; [x](../BENCHMARKS.md)\n```python\n# BENCHMARKS.md\n```\n'
          '<div class="nb-output" markdown="0">\nBENCHMARKS.md\n</div>')
    out = docs.link_benchmarks(md, Path('api/x.md'))
    assert '[`BENCHMARKS.md`](../benchmarks.md)' in out
    assert '[BENCHMARKS.md#issue-14](../benchmarks.md#issue-14)' in out
    assert '[x](../BENCHMARKS.md)' in out and '# BENCHMARKS.md\n' in out and '\nBENCHMARKS.md\n</div>' in out


def test_public_methods_get_entries():
    from dagman_fast.learner import DAGMaNLearner, FineTuneLearner
    assert {'fit_warmup_cosine', 'export_encoder', 'resume'} <= set(docs.public_methods(DAGMaNLearner))
    assert 'fine_tune_recipe' in docs.public_methods(FineTuneLearner)
    md = docs.method_entries('DAGMaNLearner', skip={'dagmanlearner-resume'})
    assert '#### DAGMaNLearner.fit_warmup_cosine {#dagmanlearner-fit_warmup_cosine}' in md
    assert '#### DAGMaNLearner.export_encoder {#dagmanlearner-export_encoder}' in md
    assert 'DAGMaNLearner.resume' not in md  # documented on the page already
    assert '| `n_epoch` | epochs to train. |' in md and 'NoneType' not in md


def test_notebooks_show_no_test_imports():
    "The cells that import fastcore.test are hidden (`#| hide`) on every page."
    for nb in sorted((REPO / 'nbs').rglob('*.ipynb')):
        for cell in json.loads(nb.read_text())['cells']:
            src = ''.join(cell['source'])
            if cell['cell_type'] == 'code' and 'fastcore.test' in src:
                assert '#| hide' in src.splitlines(), f'{nb.name}: a visible fastcore.test import'


def test_an_args_section_without_its_indentation():
    out = docs.docstring_sections('Args:\nx: the tokens.\nmask: a mask,\n  or None.\n\nMore text.')
    assert '| `x` | the tokens. |' in out and '| `mask` | a mask, or None. |' in out and out.endswith('More text.')
