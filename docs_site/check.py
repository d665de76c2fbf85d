"""Check the built site in a real browser, and take the TensorBoard screenshot the site shows.

`python docs_site/check.py _site --shots _ci/screenshots` serves `_site` on localhost and loads the home page, an API
page and a tutorial in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium): each must
have no console error, its expected headings and every image loaded. Screenshots go to `--shots` (CI artefacts,
never committed).

`python docs_site/check.py --tensorboard OUT.png` runs a two-epoch `dagman pretrain --tensorboard` demo, serves it with
`tensorboard --logdir` and saves a screenshot of TensorBoard's page for `docs_site/build.py --tensorboard-png`.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
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
                                     'pre code']),
    ('tutorials/01_pretraining.html', 'Pretraining', ['img', 'pre code']),
    ('tensorboard.html', 'TensorBoard', ['img[src="img/tensorboard.png"]']),
]


def browser(width: int = 1280, height: int = 1000):
    """Headless Debian Chromium under Selenium, with the switches a closed network needs (no background
    connections, no component updates), its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    if not (chromium and driver):
        raise SystemExit('docs: error: the browser check needs Chromium and ChromeDriver (Debian: apt-get install '
                         'chromium chromium-driver)')
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic',
              f'--window-size={width},{height}', f'--user-data-dir={tempfile.mkdtemp(prefix="chromium_")}'):
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    return webdriver.Chrome(service=Service(driver), options=opts)


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
    finally:
        drv.quit()
        server.shutdown()
    return problems


def tensorboard_shot(png: Path) -> Path:
    "A two-epoch demo logged with --tensorboard, shown by TensorBoard, saved as a screenshot."
    work = Path(tempfile.mkdtemp(prefix='dagman_tb_'))
    tb = work / 'tb'
    subprocess.run([sys.executable, '-m', 'dagman_fast.cli', 'pretrain', '--out', str(work / 'run'), '--epochs', '3',
                    '--synthetic', '2', '--crop', '32', '--bs', '1', '--tensorboard', str(tb)],
                   check=True, capture_output=True, text=True)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, '-m', 'tensorboard.main', '--logdir', str(tb), '--host', '127.0.0.1',
                             '--port', str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    drv = None
    try:
        end = time.time() + 60
        while time.time() < end:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        drv = browser(1400, 1000)
        drv.get(f'http://127.0.0.1:{port}/?pinnedCards=&tagFilter=pretrain%2F(amip|aitd%24|mask_ratio|teacher_temp)'
                '#timeseries')
        _wait_ready(drv, 30)
        time.sleep(10)  # TensorBoard loads the runs and draws the charts after the page itself
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
