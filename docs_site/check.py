"""Check the built site in a real browser, and take the TensorBoard screenshot the site shows.

`python docs_site/check.py _site --shots _ci/screenshots` serves `_site` on localhost and loads the home page, API
pages and a tutorial in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium): each must
have no console error, its expected headings (the learners' method entries among them) and every image loaded;
`dagman_learner` must show its arguments as a table, the swin page its entry points before the blocks. Every page of
the site must show no `fastcore.test` import and no `NoneType` in a signature. Screenshots go to `--shots` (CI
artefacts, never committed).

`python docs_site/check.py --tensorboard OUT.png` runs a three-epoch `dagman pretrain --tensorboard` demo, serves it
with `tensorboard --logdir` and saves a screenshot of TensorBoard's page for `docs_site/build.py --tensorboard-png`;
it fails when TensorBoard does not start or does not show the run's `pretrain/` charts.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# (page, the text its <h1> must contain, CSS selectors that must be present)
PAGES = [
    ('index.html', 'dagman_fast', ['a[href^="api/learner.html#"]',
                                     'a[href="tutorials/01_pretraining.html"]']),
    ('api/learner.html', 'learner', ['h3#dagman_learner', 'h3#dagmanlearner', 'a[href="model.html#dagmanconfig"]',
                                     'pre code', 'h4#dagmanlearner-fit_warmup_cosine',
                                     'h4#dagmanlearner-export_encoder', 'h4#dagmanlearner-resume',
                                     'h4#finetunelearner-fine_tune_recipe']),
    ('api/swin.html', 'swin', ['h3#build_encoder', 'h3#swinencoder']),
    ('tutorials/01_pretraining.html', 'Pretraining', ['img', 'pre code']),
    ('tensorboard.html', 'TensorBoard', ['img[src="img/tensorboard.png"]']),
]

# (page, entry id, argument names its argument table or list must show)
ARG_TABLES = [('api/learner.html', 'dagman_learner', ['dls', 'arch', 'encoder', 'checkpoint', '**cfg'])]
# (page, the entry that must come before, the entry after): public entry points first
ORDER = [('api/swin.html', 'build_encoder', 'swinencoder'), ('api/swin.html', 'swinencoder', 'patchembed'),
         ('api/swin.html', 'patchembed', 'droppath')]
FORBIDDEN = ['fastcore.test']  # text no page may show (the notebooks' test imports are hidden)


def _entry_args(drv, entry: str) -> list[str]:
    """The argument names in the first table or list after the entry's heading, before the next entry."""
    return drv.execute_script("""
        const h = document.getElementById(arguments[0]);
        if (!h) return null;
        for (let e = h.nextElementSibling; e && !/^H[1-4]$/.test(e.tagName) && e.tagName !== 'HR'; e = e.nextElementSibling) {
            const t = e.matches('table, ul, dl') ? e : e.querySelector('table, ul, dl');
            if (t) return Array.from(t.querySelectorAll('td:first-child code, li > code:first-child, dt code'))
                              .map(c => c.textContent);
        }
        return [];""", entry)


def check_text(drv, page: str) -> list[str]:
    """Every page: no forbidden text, no `NoneType` in a signature; the entries' order and argument tables."""
    problems = []
    text = drv.execute_script('return document.body.innerText')
    problems += [f'{page}: shows {t!r}' for t in FORBIDDEN if t in text]
    sigs = drv.execute_script("return Array.from(document.querySelectorAll('h3 + div pre code, h4 + div pre code'))"
                              ".map(c => c.textContent)")
    problems += [f'{page}: a signature shows NoneType: {s[:120]!r}' for s in sigs if 'NoneType' in s]
    raw = drv.execute_script("return Array.from(document.querySelectorAll('article p'))"
                             ".map(p => p.textContent).filter(t => /^(Args|Arguments|Parameters):\s*\S/.test(t))")
    problems += [f'{page}: an Args section shown as a paragraph, not a table: {t[:80]!r}' for t in raw]
    for p, entry, names in ARG_TABLES:
        if p == page:
            got = _entry_args(drv, entry)
            if got is None:
                problems.append(f'{page}: no entry #{entry}')
            elif not all(n in got for n in names):
                problems.append(f'{page}: #{entry} shows no table or list of its arguments {names} (found {got})')
    for p, first, later in ORDER:
        if p == page:
            pos = drv.execute_script("""
                const all = Array.from(document.querySelectorAll('h2, h3, h4')).map(h => h.id);
                return [all.indexOf(arguments[0]), all.indexOf(arguments[1])];""", first, later)
            if -1 in pos or pos[0] > pos[1]:
                problems.append(f'{page}: #{first} must come before #{later} (positions {pos})')
    return problems


class _Stop(Exception):
    pass


def _on_sigterm(*_):  # `timeout` sends SIGTERM: unwind, so the `finally`s stop Chromium and TensorBoard
    raise _Stop('stopped by SIGTERM')


def browser(width: int = 1280, height: int = 1000):
    """Headless Debian Chromium under Selenium, with the switches a closed network needs (no background
    connections, no component updates), its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')  # Debian's, or Ubuntu's name
    driver = shutil.which('chromedriver')
    if not (chromium and driver):
        raise SystemExit('docs: error: the browser check needs Chromium and ChromeDriver (Debian: apt-get install '
                         'chromium chromium-driver)')
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic',
              f'--window-size={width},{height}'):
        opts.add_argument(a)
    profile = tempfile.mkdtemp(prefix='chromium_')
    opts.add_argument(f'--user-data-dir={profile}')
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    quit_ = drv.quit

    def quit_and_clean():  # the profile folder goes with the browser
        quit_()
        shutil.rmtree(profile, ignore_errors=True)
    drv.quit = quit_and_clean
    return drv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def serve(folder: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', _free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f'http://127.0.0.1:{server.server_address[1]}', server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _wait_ready(drv, timeout: float = 15):
    end = time.time() + timeout
    while time.time() < end and drv.execute_script('return document.readyState') != 'complete':
        time.sleep(0.1)


def check_site(site: Path, shots: Path) -> list[str]:
    "Problems found on the checked pages; screenshots written to `shots`."
    from selenium.webdriver.common.by import By
    base, server = serve(site)
    shots.mkdir(parents=True, exist_ok=True)
    problems, drv = [], browser()
    try:
        for page, h1, selectors in PAGES:
            if not (site / page).exists():
                problems.append(f'{page}: not in the built site')
                continue
            drv.get(f'{base}/{page}')
            _wait_ready(drv)
            time.sleep(0.5)  # the theme's scripts
            heads = [e.text for e in drv.find_elements(By.TAG_NAME, 'h1')]
            if not any(h1.lower() in h.lower() for h in heads):
                problems.append(f'{page}: no <h1> containing {h1!r} (found {heads})')
            for sel in selectors:
                if not drv.find_elements(By.CSS_SELECTOR, sel):
                    problems.append(f'{page}: nothing matches {sel!r}')
            problems += check_text(drv, page)
            broken = drv.execute_script(
                'return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))'
                '.map(i => i.getAttribute("src"))')
            n_img = drv.execute_script('return document.images.length')
            if broken:
                problems.append(f'{page}: images not loaded: {broken}')
            errors = [e['message'] for e in drv.get_log('browser') if e['level'] == 'SEVERE']
            if errors:
                problems.append(f'{page}: console errors: {errors}')
            name = page.replace('/', '_').replace('.html', '.png')
            drv.save_screenshot(str(shots / name))
            print(f'{page}: ok' if not any(p.startswith(page) for p in problems) else f'{page}: FAILED',
                  f'({n_img} images, screenshot {name})')
        checked = {p for p, *_ in PAGES}
        for html in sorted(site.rglob('*.html')):  # every other page: no forbidden text, clean signatures
            page = html.relative_to(site).as_posix()
            if page in checked or page == '404.html':
                continue
            drv.get(f'{base}/{page}')
            _wait_ready(drv)
            found = check_text(drv, page)
            problems += found
            print(f'{page}: ok' if not found else f'{page}: FAILED')
    finally:
        drv.quit()
        server.shutdown()
    return problems


def tensorboard_shot(png: Path) -> Path:
    "A two-epoch demo logged with --tensorboard, shown by TensorBoard, saved as a screenshot."
    work = Path(tempfile.mkdtemp(prefix='dagman_tb_'))
    tb = work / 'tb'
    run = subprocess.run([sys.executable, '-m', 'dagman_fast.cli', 'pretrain', '--out', str(work / 'run'),
                          '--epochs', '3', '--synthetic', '2', '--crop', '32', '--bs', '1', '--tensorboard', str(tb)],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f'docs: error: the TensorBoard demo run failed:\n{run.stderr[-2000:]}')
    port = _free_port()
    proc = subprocess.Popen([sys.executable, '-m', 'tensorboard.main', '--logdir', str(tb), '--host', '127.0.0.1',
                             '--port', str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    drv = None
    try:
        end = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise SystemExit(f'docs: error: tensorboard exited ({proc.returncode}): {proc.stderr.read()[-2000:]}')
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                if time.time() > end:
                    raise SystemExit(f'docs: error: tensorboard did not open port {port} within 90 s') from None
                time.sleep(0.5)
        drv = browser(1400, 1000)
        drv.get(f'http://127.0.0.1:{port}/?pinnedCards=&tagFilter=pretrain%2F(amip|aitd%24|mask_ratio|teacher_temp)'
                '#timeseries')
        _wait_ready(drv, 30)
        end = time.time() + 60  # TensorBoard loads the runs and draws the charts after the page itself
        while time.time() < end and not ('pretrain/amip' in drv.page_source and drv.find_elements('css selector',
                                                                                               'canvas, svg path')):
            time.sleep(1)
        if 'pretrain/amip' not in drv.page_source:
            raise SystemExit("docs: error: TensorBoard's page does not show the run's pretrain/amip chart")
        time.sleep(3)  # the lines are drawn after their cards
        png.parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(png))
    finally:
        if drv is not None:
            drv.quit()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('site', nargs='?', help='the built site (docs_site/build.py --out)')
    p.add_argument('--shots', default='_ci/screenshots', help='folder for the screenshots (default _ci/screenshots)')
    p.add_argument('--tensorboard', metavar='PNG', help='only make the TensorBoard screenshot, to PNG')
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.tensorboard:
        print('TensorBoard screenshot:', tensorboard_shot(Path(args.tensorboard)))
        return 0
    if not args.site:
        p.error('give the built site, or --tensorboard PNG')
    problems = check_site(Path(args.site), Path(args.shots))
    for m in problems:
        print(f'docs: error: {m}', file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
