"""Where the library's recipe spends its time against the plain loop, part by part, side by side (issue 11).

`bench_recipe.py` measures the whole of both trainings (library/plain 1.16 wall, 1.20 CPU), and `bench_learner.py`
shows that fastai's training loop itself costs nothing (same model, same batches: ratio 0.92). What is left is in
what each recipe computes per batch. This script times the three parts on the same random batches (batch 16, 64 px
by default), each library/plain pair alternating in one process, so that machine load affects both alike:

- model: forward, loss and backward of the library's `MultiTaskModel` (resnet18 + 512-256 dense embedding + U-Net
  decoder of 128-64-32-16 channels, cross-entropy + soft Dice on the mask through `MultiTaskLoss`) against the plain
  loop's `PlainUNet` (resnet18 + one conv-BN-ReLU per level at the encoder's widths, cross-entropy + cross-entropy);
- optimiser step: fastai's `Adam` (what `Learner` uses) against torch's `AdamW`, for-loop (the plain loop's on the
  CPU) and `foreach`, all on the library model's parameters;
- augmentation: the library's batch augmentations (`mtl_augmentations`: fastai's flips, rotation and zoom by one
  affine warp with `grid_sample`, brightness/contrast, hue, saturation) against the plain loop's quarter turns,
  flips and brightness/contrast, on a batch of images and masks;
- data: one epoch of training batches, files read, resized, collated and augmented: the library's
  `mtl_dataloaders` (fastai's DataBlock, its default loader workers) against the plain loop's torch `DataLoader`
  over `CellDataset` (main process) + `augment`, on segmentation_WBC Dataset 1's training rows (`bench_recipe.py`'s
  table; synthetic cells without the data).

    python benchmarks/bench_recipe_parts.py [--size 64] [--bs 16] [--steps 10] [--rounds 3] [--data DIR|synthetic]

Prints the median milliseconds per batch (per epoch for the data) of each and the ratio library/plain (median of
the rounds' ratios).

Output with `--rounds 2 --steps 5`, one torch thread, on 2 cores shared with two long training jobs (load average
about 3.5, so absolute times are stretched; read the ratios):

    batch 16 at 64 px, 1 torch threads; parameters: library 12.85 M, plain 13.58 M
    model: forward + loss + backward   library    469.5 ms   plain    669.3 ms   ratio 0.70  (rounds: 0.70, 0.70)
    optimiser: fastai Adam / AdamW loop library    162.5 ms   plain    127.7 ms   ratio 1.27  (rounds: 1.36, 1.19)
    optimiser: fastai Adam / AdamW foreach library    163.7 ms   plain    122.2 ms   ratio 1.34  (rounds: 1.32, 1.37)
    augmentation: library / plain      library     32.3 ms   plain      2.8 ms   ratio 11.58  (rounds: 12.09, 11.07)
    data: segmentation_WBC Dataset 1, 241 training images, 15 batches per epoch
    data: one epoch of batches         library   1218.4 ms   plain    330.8 ms   ratio 3.68  (rounds: 3.77, 3.60)

With two torch threads the model ratio was 0.79, the optimiser's 1.31 / 1.52, the data's 2.95. So the library's
model (narrow decoder, Dice term included) costs 20-30 % *less* per batch than the loop's, and the gap of the end to
end run (1.16-1.20, `bench_recipe.py`) comes from around the model: fastai's data pipeline (about 60 ms more per
batch of 16, of which about 30 ms is the affine-warp augmentation), fastai's `Adam` step (30-50 ms more than torch's
`AdamW`), and what `bench_recipe.py` adds and this script does not time (the validation pass every 5 epochs, the
loaders' worker start each epoch). Replacing the optimiser (torch's `AdamW` through fastai's `OptimWrapper`) would
change every trained number, so it waits until no cached experiment is being extended with the current recipe.
"""
import os
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import argparse, statistics, sys, time, warnings
from pathlib import Path
import torch, torch.nn.functional as F
from fastai.optimizer import Adam
from fastai.vision.all import Pipeline, TensorImage, TensorMask
from mtlrobust.tasks import classification_task, segmentation_task
from mtlrobust.models import MultiTaskModel
from mtlrobust.weighting import MultiTaskLoss
from mtlrobust.data import mtl_augmentations
sys.path.insert(0, str(Path(__file__).parent))
from plain_loop import PlainUNet, CellDataset, augment
from bench_recipe import read_table
from mtlrobust.core import class_vocab
from mtlrobust.data import mtl_dataloaders

VOCAB = ['basophil', 'eosinophil', 'lymphocyte', 'monocyte', 'neutrophil']

def batch(bs, size, seed=0):
    "Random images in [0,1], class indices and mask codes of one batch"
    g = torch.Generator().manual_seed(seed)
    return torch.rand(bs, 3, size, size, generator=g), torch.randint(5, (bs,), generator=g), torch.randint(3, (bs, size, size), generator=g)

def library_model():
    tasks = [classification_task(vocab=VOCAB), segmentation_task()]
    return MultiTaskModel('resnet18', tasks).train(), MultiTaskLoss(tasks)

def library_step(model, loss_func, x, y, m):
    model.zero_grad(); out = model(x)
    loss_func(out, y, m).backward()

def plain_step(model, x, y, m):
    model.zero_grad(); out = model(x)
    (F.cross_entropy(out['label'], y) + F.cross_entropy(out['mask'], m)).backward()

def timed(f, steps):
    "Milliseconds per call of `f` over `steps` calls, after one warm-up call"
    f(); start = time.perf_counter()
    for _ in range(steps): f()
    return (time.perf_counter() - start) / steps * 1e3

def compare(name, library, plain, steps, rounds):
    "Time the pair alternately for `rounds` rounds; print medians and the ratio"
    lib, pl, ratios = [], [], []
    for r in range(rounds):
        a, b = (timed(library, steps), timed(plain, steps)) if r % 2 == 0 else reversed((timed(plain, steps), timed(library, steps)))
        lib.append(a); pl.append(b); ratios.append(a / b)
    print(f"{name:<34} library {statistics.median(lib):8.1f} ms   plain {statistics.median(pl):8.1f} ms   "
          f"ratio {statistics.median(ratios):.2f}  (rounds: {', '.join(f'{q:.2f}' for q in ratios)})", flush=True)
    return statistics.median(ratios)

def epoch(dl, step=lambda b: None):
    "One pass over `dl`, each batch handed to `step`"
    for b in dl: step(b)

def main(size=64, bs=16, steps=10, rounds=3, data=None):
    torch.manual_seed(0)
    x, y, m = batch(bs, size)
    lib_model, lib_loss = library_model()
    plain_model = PlainUNet(len(VOCAB)).train()
    n_lib, n_plain = (sum(p.numel() for p in mdl.parameters()) for mdl in (lib_model, plain_model))
    print(f"batch {bs} at {size} px, {torch.get_num_threads()} torch threads; parameters: library {n_lib/1e6:.2f} M, plain {n_plain/1e6:.2f} M")
    compare('model: forward + loss + backward', lambda: library_step(lib_model, lib_loss, x, y, m), lambda: plain_step(plain_model, x, y, m), steps, rounds)
    library_step(lib_model, lib_loss, x, y, m)  # gradients for the optimisers
    params = [p for p in lib_model.parameters() if p.requires_grad]
    fastai_adam, loop_adamw, foreach_adamw = Adam(params, lr=2e-3), torch.optim.AdamW(params, lr=2e-3, foreach=False), torch.optim.AdamW(params, lr=2e-3, foreach=True)
    compare('optimiser: fastai Adam / AdamW loop', fastai_adam.step, loop_adamw.step, steps, rounds)
    compare('optimiser: fastai Adam / AdamW foreach', fastai_adam.step, foreach_adamw.step, steps, rounds)
    tfms, g = Pipeline(mtl_augmentations(), split_idx=0), torch.Generator().manual_seed(1)
    compare('augmentation: library / plain', lambda: tfms((TensorImage(x), TensorMask(m))), lambda: augment(x, m, g), steps, rounds)
    table, what = read_table(data or os.environ.get('MTLROBUST_DATA'))
    train = table[table.split == 'train']
    dls = mtl_dataloaders(table, tasks=['label', 'mask'], size=size, bs=bs, split=table.split.replace({'test': 'valid'}), seed=0)
    plain_dl = torch.utils.data.DataLoader(CellDataset(train, class_vocab(table.label), size), bs, shuffle=True, drop_last=True)
    print(f"data: {what}, {len(train)} training images, {len(dls.train)} batches per epoch")
    compare('data: one epoch of batches', lambda: epoch(dls.train), lambda: epoch(plain_dl, lambda b: augment(b[0], b[2], g)), 1, rounds)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=64); p.add_argument('--bs', type=int, default=16)
    p.add_argument('--steps', type=int, default=10); p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--data', default=None, help="folder holding segmentation_WBC/ (default: $MTLROBUST_DATA), or 'synthetic'")
    a = p.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        main(a.size, a.bs, a.steps, a.rounds, a.data)
