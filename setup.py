"""Package metadata comes from settings.ini (the one source of truth); see DESIGN.md."""
from configparser import ConfigParser
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
cfg = ConfigParser(delimiters=['='])
cfg.read(here / 'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
EXTRAS = ('analysis', 'tensorboard', 'docs')  # the optional `<name>_requirements` of settings.ini

licenses = {'apache2': ('Apache-2.0', 'License :: OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable']
py_versions = ['3.10', '3.11', '3.12', '3.13']
min_python = cfg['min_python']
lic = licenses[cfg['license']]
scripts = [s.strip() for s in cfg.get('console_scripts', '').splitlines() if s.strip()]

setup(
    name=cfg['lib_name'],
    version=cfg['version'],
    description=cfg['description'],
    long_description=(here / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    keywords=cfg['keywords'],
    author=cfg['author'],
    author_email=cfg['author_email'],
    license=lic[0],
    classifiers=[
        f"Development Status :: {statuses[int(cfg['status']) - 1]}",
        f"Intended Audience :: {cfg['audience']}",
        lic[1],
        f"Natural Language :: {cfg['language']}",
        'Topic :: Scientific/Engineering :: Medical Science Apps.',
    ] + [f'Programming Language :: Python :: {v}' for v in py_versions[py_versions.index(min_python):]],
    python_requires=f'>={min_python}',
    # `kernels/` sits at the top of the repo (Triton next to its references, no fastai) and installs as
    # `dagman_fast.kernels`.
    packages=['dagman_fast', 'dagman_fast.kernels'],
    package_dir={'dagman_fast': 'dagman_fast', 'dagman_fast.kernels': 'kernels'},
    include_package_data=True,
    package_data={'dagman_fast': ['demo_data/*.nii.gz', 'demo_data/README.md']},  # the demo's two real CTs
    install_requires=cfg['requirements'].split(),
    extras_require={'dev': cfg['dev_requirements'].split() + [r for e in EXTRAS for r in cfg[f'{e}_requirements'].split()],
                    **{e: cfg[f'{e}_requirements'].split() for e in EXTRAS}},
    entry_points={'console_scripts': scripts, 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
