#!/usr/bin/env python
"""Screenshots of the rendered docs: the home page and one module page, with headless Chromium.

Run from the repository root after `python scripts/check_docs.py` (which renders the pages to
`_proc/_html/`): `python scripts/screenshot_docs.py [PAGE ...]`, PAGE an HTML page name (default: `tasks`).
Writes `_proc/_screens/<page>.png` (git-ignored) and prints the paths.
"""
import argparse, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HTML, SCREENS = ROOT/'_proc'/'_html', ROOT/'_proc'/'_screens'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--hide-scrollbars']

def chromium():
    for name in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
        if (p := shutil.which(name)): return p
    sys.exit('Chromium not found. On Debian/Ubuntu: apt-get install -y chromium')

def shoot(exe, page, dest, size):
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([exe, *FLAGS, f'--user-data-dir={profile}', f'--screenshot={dest}', f'--window-size={size}',
                            page.as_uri()], capture_output=True, text=True, timeout=120)
    if not dest.exists(): sys.exit(f'Chromium wrote no screenshot of {page} (exit {r.returncode}):\n{r.stderr[-2000:]}')

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('pages', nargs='*', default=['tasks'], help='module pages besides index (default: tasks)')
    ap.add_argument('--size', default='1280,1600', help='window size WIDTH,HEIGHT')
    args = ap.parse_args()
    exe = chromium()
    SCREENS.mkdir(parents=True, exist_ok=True)
    pages = [HTML/(name if name.endswith('.html') else name + '.html') for name in ['index', *args.pages]]
    for page in pages:
        if not page.exists(): sys.exit(f'{page} not found: run `python scripts/check_docs.py` first (pages: '
                                       f'{", ".join(sorted(p.stem for p in HTML.glob("*.html"))) or "none"})')
    for page in pages:
        dest = SCREENS/(page.stem + '.png')
        dest.unlink(missing_ok=True)
        shoot(exe, page, dest, args.size)
        print(dest)

if __name__ == '__main__': main()
