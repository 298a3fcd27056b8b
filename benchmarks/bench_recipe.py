"""End-to-end training time of the library's default recipe against the plain PyTorch loop (`plain_loop.py`), side by side.

Both train a class + mask model on the same table's train rows, timed from the call to the trained model, data
loading and augmentation included:

- library: `mtlrobust.workflow.train_model(table, [classification_task(), segmentation_task()], seed=0)` with the
  default recipe (`RECIPE`: batch 16, lr 2e-3), i.e. fastai `mtl_learner` + `fit_one_cycle` (images read in the training process, its batch
  augmentations on the CPU, and a validation pass over the test rows, which it monitors because the split has no
  valid rows, every 5 epochs and after the last: `train_model`'s `validate_every`);
- plain: `train_plain(table, vocab, bs=16, lr=3e-3, seed=0)` at its own settings (no validation pass, loader in the
  main process).

Default data: segmentation_WBC Dataset 1 under `$MTLROBUST_DATA`, split by `split_stratified(table, valid_pct=0,
test_pct=0.2, seed=0)` (241 train / 59 test); synthetic cells (`synth_wbc`) with a note when it is absent. The
default cost is reduced (64 px, 5 epochs each: one validation pass, as in every 5 epochs of the full recipe) so
that the run takes a few minutes on two shared cores; the
accuracy and Dice printed at the end are a sanity check of such a short run, not results. Prints seconds per epoch
and per training image (per epoch) for each and the ratio library/plain, in wall-clock time and in CPU time (this
process plus its finished children, so fastai's loader workers count; less disturbed by other processes on a shared
machine). `--workers N` times the recipe with fastai's N loader workers too. The `--rounds` alternate which runs first; medians over rounds are printed, the ratio being the median of
the rounds' ratios.

    python benchmarks/bench_recipe.py [--size 64] [--epochs 5] [--rounds 3] [--workers N] [--data DIR|synthetic]

The last line of each block scales the ratio to each recipe's full length (the library's `RECIPE` epochs against the
loop's 25): both spend about the same per epoch whatever the epoch count (the library's validation every 5 epochs
averaged in, for a multiple of 5 epochs), so the measured ratio carries over.

Measured before `num_workers=0` became `train_model`'s default, with this script's functions in one process: the old
default (fastai's two loader workers), the new one (`w0`) and the plain loop side by side, `--rounds 2`, 5 epochs at
64 px (2 cores shared with one training at `nice 10`); condensed by hand, per round:

    segmentation_WBC Dataset 1: 241 train / 59 test images, 64 px, 5 epochs each, 2 round(s)
    wall-clock, seconds (rounds): library with 2 workers 75.0, 85.6   library w0 68.1, 72.1   plain 64.0, 74.4
      ratio library with 2 workers/plain: 1.17, 1.15      ratio library w0/plain: 1.06, 0.97
    CPU time, seconds (rounds):   library with 2 workers 90.5, 105.1  library w0 79.2, 85.5   plain 75.8, 90.3
      ratio library with 2 workers/plain: 1.19, 1.16      ratio library w0/plain: 1.05, 0.95

So the recipe's end-to-end time is within the issue's 1.1 times the loop's once the images are read in the training
process, as the plain loop reads them. fastai forks its loader workers anew every epoch (each takes the epoch's
order when it is forked), and with a few hundred cells of 64 px that start costs more than two processes reading in
parallel save. What the recipe still spends more per batch (fastai's `Adam` step, 30-50 ms against torch's
`AdamW`; its affine-warp augmentation, about 30 ms: `bench_recipe_parts.py`) is paid back by its cheaper model (the
narrow U-Net decoder: 0.70-0.79 of the loop's forward and backward).

Where the library's time went before (cProfile of `train_model` at 64 px, 2 epochs, one thread): backward pass 47 %,
forward pass 26 %, the validation pass after every epoch 12 % (now every 5 epochs: `validate_every`), fastai's
Adam step 10 %, batch augmentations 6 %.
"""
import os
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import argparse, statistics, sys, time, warnings
from pathlib import Path
import torch
from mtlrobust.core import class_vocab
from mtlrobust.data import load_segmentation_wbc, split_stratified
from mtlrobust.tasks import classification_task, segmentation_task
from mtlrobust.metrics import classification_scores, segmentation_scores
from mtlrobust.synth import synth_wbc
from mtlrobust.workflow import train_model, evaluate_table, RECIPE
sys.path.insert(0, str(Path(__file__).parent))
from plain_loop import CellDataset, train_plain, predict_plain
import inspect
PLAIN_EPOCHS = inspect.signature(train_plain).parameters['epochs'].default  # the plain loop's full length

def read_table(data, n_synthetic=300):
    "(table with a `split` column, description): segmentation_WBC Dataset 1, else synthetic cells"
    folder = Path(data or '') / 'segmentation_WBC'
    if data != 'synthetic' and folder.is_dir():
        table = load_segmentation_wbc(folder)
        table = table[table.domain.str.endswith('Dataset 1')].reset_index(drop=True)
        what = 'segmentation_WBC Dataset 1'
    else:
        why = '--data synthetic' if data == 'synthetic' else f"no segmentation_WBC under {data!r} (--data or $MTLROBUST_DATA)"
        print(f"note: {why}; timing on {n_synthetic} synthetic cells instead")
        table, what = synth_wbc(n_synthetic, size=96, seed=0), f'{n_synthetic} synthetic cells'
    table['split'] = split_stratified(table, valid_pct=0, test_pct=0.2, seed=0)
    return table, what

def run_library(table, size, epochs, **kwargs):
    "The library's default recipe (`RECIPE`'s batch size and learning rate) for `epochs` epochs"
    return train_model(table, [classification_task(), segmentation_task()], size=size, epochs=epochs, seed=0, progress=False, **kwargs)

def run_plain(table, size, epochs):
    return train_plain(table, class_vocab(table.label), size=size, epochs=epochs, bs=16, lr=3e-3, seed=0)

def sanity(name, trained, table, size):
    "Test accuracy, balanced accuracy and nucleus/cytoplasm Dice, each through the library's metric functions"
    test = table[table.split == 'test']
    if name == 'library':
        m = evaluate_table(trained, test)
        return {k: m[k] for k in ('label_acc', 'label_bacc', 'mask_dice_nucleus', 'mask_dice_cytoplasm')}
    vocab = class_vocab(table.label)
    probs, masks = predict_plain(trained, test, vocab, size)
    targ = CellDataset(test, vocab, size)
    y = torch.tensor([targ[i][1] for i in range(len(targ))]); m = torch.stack([targ[i][2] for i in range(len(targ))])
    c, s = classification_scores(probs, y, scores=('acc', 'bacc')), segmentation_scores(masks, m, scores=('dice',))
    return dict(label_acc=c['acc'], label_bacc=c['bacc'], mask_dice_nucleus=s['dice_nucleus'], mask_dice_cytoplasm=s['dice_cytoplasm'])

def cpu_time():
    "CPU seconds of this process and of its finished children (fastai's loader workers, joined after each epoch)"
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

def report(label, secs, epochs, n_train):
    med = statistics.median(secs)
    return (f"{label}: {med:6.1f} s  {med/epochs:5.1f} s/epoch  {1000*med/epochs/n_train:5.1f} ms/image"
            f"   (rounds: {', '.join(f'{t:.1f}' for t in secs)})")

def main(size=64, epochs=2, rounds=3, data=None, workers=0):
    table, what = read_table(data or os.environ.get('MTLROBUST_DATA'))
    n_train = int((table.split == 'train').sum())
    for f in list(table.image) + list(table['mask']): Path(f).read_bytes()   # files in the page cache for both
    runs = dict(library=run_library, plain=run_plain)
    if workers: runs[f'library, {workers} workers'] = lambda t, s, e: run_library(t, s, e, num_workers=workers)
    wall, cpu, trained = {k: [] for k in runs}, {k: [] for k in runs}, {}
    load0 = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0, c0 = time.perf_counter(), cpu_time()
            with warnings.catch_warnings():
                warnings.simplefilter('ignore'); trained[name] = runs[name](table, size, epochs)
            wall[name].append(time.perf_counter() - t0); cpu[name].append(cpu_time() - c0)
    load1 = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f"{what}: {n_train} train / {len(table) - n_train} test images, {size} px, {epochs} epochs each, "
          f"{rounds} round(s), {torch.get_num_threads()} torch threads on {os.cpu_count()} cores, "
          f"load average {load0:.1f} before, {load1:.1f} after")
    ratios = {}
    for kind, secs in [('wall-clock', wall), ('CPU time', cpu)]:
        print(f"{kind} (median of rounds; the rounds in brackets):")
        print('  ' + report('plain loop     (bs 16)', secs['plain'], epochs, n_train))
        for name in (n for n in runs if n != 'plain'):
            print('  ' + report(f"{name} recipe (bs {RECIPE['bs']})", secs[name], epochs, n_train))
            per_round = [a / b for a, b in zip(secs[name], secs['plain'])]
            ratios[kind, name] = statistics.median(per_round)
            print(f"  ratio {name}/plain: {ratios[kind, name]:.2f}  (median of the rounds' ratios: {', '.join(f'{q:.2f}' for q in per_round)});"
                  f" at each recipe's full length ({RECIPE['epochs']} against {PLAIN_EPOCHS} epochs): {ratios[kind, name] * RECIPE['epochs'] / PLAIN_EPOCHS:.2f}")
    print("sanity check after this short run (test rows; not a result):")
    for name in ('library', 'plain'):
        print(f"  {name:8s} " + '  '.join(f"{k} {v:.3f}" for k, v in sanity(name, trained[name], table, size).items()))
    return ratios

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--epochs', type=int, default=5)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--workers', type=int, default=0, help="also time the library's recipe with this many loader workers (fastai's, started every epoch)")
    ap.add_argument('--data', default=None, help="folder holding segmentation_WBC/ (default: $MTLROBUST_DATA), or 'synthetic'")
    main(**vars(ap.parse_args()))
