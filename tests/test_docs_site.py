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
