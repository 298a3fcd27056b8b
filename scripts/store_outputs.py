"""Run library notebooks and store their outputs for the documentation, small: `python scripts/store_outputs.py [--slow] [NOTEBOOK ...]`

Runs `nbdev-test --save` on the notebooks (default: every library notebook and the home page, not the paper notebooks
30 and up, whose long runs have their own command), then shrinks what was stored: figures drawn at twice their size
(execnb's 'retina' format) are brought back to their size and saved with an adaptive palette, and the torch
FutureWarning that fastai's import prints is dropped. Finally `nbdev-clean` tidies the notebooks. `--slow` runs the
cells marked `slow` too (minutes), so that their tables and figures are stored as well."""
import base64, io, json, re, subprocess, sys
from pathlib import Path
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
NOISE = re.compile(r"FutureWarning: `torch\.jit\.script` is deprecated")

def library_notebooks()->list:
    "Every library notebook (numbered below 30) and the home page"
    return sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if p.name == 'index.ipynb' or (p.name[:2].isdigit() and int(p.name[:2]) < 30))

def small_png(b64:str)->str:
    "The PNG at half its pixel size (retina to 1x), with a 256-colour adaptive palette"
    im = Image.open(io.BytesIO(base64.b64decode(b64))).convert('RGBA')
    im = im.resize((max(im.width//2, 1), max(im.height//2, 1)), Image.LANCZOS).quantize(256, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO(); im.save(out, 'PNG', optimize=True)
    return base64.b64encode(out.getvalue()).decode()

def shrink(nb_path:Path):
    "Shrink the figures and drop the noise of one saved notebook, in place"
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    for cell in nb['cells']:
        outs = [o for o in cell.get('outputs', []) if not (o['output_type'] == 'stream' and NOISE.search(''.join(o['text'])))]
        for o in outs:
            data = o.get('data', {})
            if 'image/png' in data:
                data['image/png'] = small_png(data['image/png'])
                o.get('metadata', {}).pop('image/png', None)
        if 'outputs' in cell: cell['outputs'] = outs
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')

if __name__ == '__main__':
    flags = ['--flags', 'slow', '--cell-timeout', '0'] if '--slow' in sys.argv else []
    nbs = [Path(a).resolve() for a in sys.argv[1:] if a != '--slow'] or library_notebooks()
    for nb in nbs:
        subprocess.run(['nbdev-test', str(nb), '--save', *flags], check=True, cwd=ROOT)
        shrink(nb)
        print(f"stored {nb.relative_to(ROOT)}: {nb.stat().st_size//1024} KiB")
    subprocess.run(['nbdev-clean'], check=True, cwd=ROOT)
