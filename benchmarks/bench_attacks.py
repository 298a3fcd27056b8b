"""Attack benchmarks, measured side by side in one run on a briefly trained multi-task model (class + mask heads).

(1) Our PGD against torchattacks': `MultiTaskPGD(tasks=['label'])` and `torchattacks.PGD` on `TaskView(model, 'label')`,
    same model, batch, eps, step size and steps, in interleaved rounds (alternating which runs first), each round from
    the same random state. Prints the median time ratio (goal: within 5%) and the largest pixel difference between the
    two adversarial batches (expected: 0).
(2) STBO against grid search (STM) for the spatial adversary of the class head: the mean over images of the worst-case
    loss found, as a function of the number of model evaluations per image. The grids are nested (3, 5, ... points per
    axis, `linspace` of 2^k + 1 points), so the largest grid is evaluated once and the smaller ones are its subsets.
    Prints the evaluations each search needs to reach 95% of the largest grid's worst case (goal: STBO at most a tenth).

    python benchmarks/bench_attacks.py [--bs 12] [--size 48] [--steps 10] [--rounds 5] [--grid 3] [--budget 60]

On a small shared VM, spinning OpenMP workers can starve each other; the script makes them wait passively unless
OMP_WAIT_POLICY is already set.
"""
import os
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import argparse, statistics, time
import numpy as np, pandas as pd, torch, torch.nn as nn
import torchattacks
from fastai.vision.all import Adam, set_seed
from mtlrobust.synth import synth_wbc
from mtlrobust.data import mtl_dataloaders
from mtlrobust.learner import mtl_learner
from mtlrobust.attacks import MultiTaskPGD, TaskView, SpatialAttack, attack_mode, attacked_tasks, spatial_losses


def trained_model(size, n=64, epochs=2, seed=0):
    "A class + mask model trained briefly on synthetic cells, BatchNorm statistics re-estimated, and a validation batch"
    set_seed(seed)
    cells = pd.concat([synth_wbc(n//2, size=size, domain='A', seed=seed), synth_wbc(n//2, size=size, domain='B', seed=seed + 1)])
    cells = cells.sort_index(kind='stable').reset_index(drop=True)
    cells['split'] = ['train']*(n - n//4) + ['valid']*(n//4)
    dls = mtl_dataloaders(cells, tasks=['label', 'mask'], size=size, bs=16, num_workers=0)
    learn = mtl_learner(dls, arch='resnet18', emb_sizes=(32,), decoder_channels=(16, 16, 8, 8), metrics=False, opt_func=Adam)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3)
    model = learn.model
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model.train()
        for m in bns: m.reset_running_stats(); m.momentum = None
        for xb, *_ in dls.train: model(xb)
        for m in bns: m.momentum = 0.1
    return model.eval(), dls


def batch_of(dls, bs):
    "`bs` validation (then training) samples as plain tensors"
    xs, ys = [], []
    for dl in (dls.valid, dls.train.new(shuffle=False, drop_last=False)):
        for x, *y in dl:
            xs.append(x.as_subclass(torch.Tensor)); ys.append([t.as_subclass(torch.Tensor) for t in y])
    x = torch.cat(xs)[:bs]
    return x, tuple(torch.cat(t)[:bs] for t in zip(*ys))


def bench_pgd(model, x, y, eps, alpha, steps, rounds):
    "Interleaved timing of our single-task PGD and torchattacks' PGD from the same random states"
    ours = MultiTaskPGD('label', eps=eps, alpha=alpha, steps=steps)
    view = TaskView(model, 'label').eval()
    theirs = torchattacks.PGD(view, eps=eps, alpha=alpha, steps=steps)
    def run_ours(): return ours(model, x, *y)[0]
    def run_theirs(): return theirs(x, y[0])
    times, diff = {'ours': [], 'torchattacks': []}, 0.
    for r in range(rounds + 1):  # round 0 warms up both and is discarded
        order = [('ours', run_ours), ('torchattacks', run_theirs)]
        if r % 2: order.reverse()
        out = {}
        for name, run in order:
            torch.manual_seed(1000 + r)
            t0 = time.perf_counter(); out[name] = run(); dt = time.perf_counter() - t0
            if r: times[name].append(dt)
        diff = max(diff, (out['ours'] - out['torchattacks']).abs().max().item())
    return {k: statistics.median(v) for k, v in times.items()}, diff


def nested_grid_worst(model, x, y, max_angle, max_shift, k_max, max_batch=1024):
    "Worst-case loss per image (N,) of each nested grid with 2^j + 1 points per axis, j = 1 .. k_max"
    n = 2**k_max + 1
    axes = [np.linspace(-max_angle, max_angle, n)] + [np.linspace(-max_shift, max_shift, n)]*2
    grid = torch.tensor(np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3), dtype=x.dtype)
    tasks = attacked_tasks(model, 'label')
    k = max(max_batch // len(x), 1)
    vals = []
    with attack_mode(model), torch.no_grad():
        for chunk in grid.split(k):
            p = chunk.repeat_interleave(len(x), 0)
            yr = tuple(t.repeat(len(chunk), *[1]*(t.ndim - 1)) for t in y)
            vals.append(spatial_losses(model, x.repeat(len(chunk), 1, 1, 1), yr, tasks, p).view(len(chunk), len(x)))
    vals = torch.cat(vals).view(n, n, n, len(x))
    res = {}
    for j in range(1, k_max + 1):
        step = 2**(k_max - j)
        sub = vals[::step, ::step, ::step]
        res[sub.shape[0]**3] = sub.reshape(-1, len(x)).max(0).values.numpy()
    return res


def first_reaching(curve, target):
    "1-based index of the first value of `curve` reaching `target`, or None"
    hit = np.flatnonzero(curve >= target)
    return int(hit[0]) + 1 if len(hit) else None


def main(bs=12, size=48, steps=10, rounds=5, grid=3, budget=60, max_angle=180., max_shift=4., seed=0):
    t_start = time.perf_counter()
    model, dls = trained_model(size, seed=seed)
    x, y = batch_of(dls, bs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model trained in {time.perf_counter()-t_start:.0f} s")

    eps, alpha = 8/255, 2/255
    med, diff = bench_pgd(model, x, y, eps, alpha, steps, rounds)
    print(f"\n(1) PGD on the class head: batch {len(x)} at {size} px, eps 8/255, alpha 2/255, {steps} steps, {rounds} interleaved rounds")
    print(f"    torchattacks.PGD on TaskView  : median {med['torchattacks']:.3f} s")
    print(f"    MultiTaskPGD(tasks=['label']) : median {med['ours']:.3f} s")
    ratio = med['ours']/med['torchattacks']
    print(f"    time ratio ours/torchattacks  : {ratio:.3f} ({100*(ratio-1):+.1f}%; goal within 5%)")
    print(f"    max |x_ours - x_torchattacks| : {diff:.3g} (same random start)")

    t0 = time.perf_counter()
    grids = nested_grid_worst(model, x, y, max_angle, max_shift, grid)
    t_grid = time.perf_counter() - t0
    t0 = time.perf_counter()
    bo = SpatialAttack('label', 'bo', max_angle=max_angle, max_shift=max_shift, budget=budget, seed=seed)
    bo(model, x, *y)
    t_bo = time.perf_counter() - t0
    bo_best = np.maximum.accumulate(bo.last_values, 1)  # (N, budget) running worst case of each image
    bo_curve = bo_best.mean(0)
    with torch.no_grad(): clean = spatial_losses(model, x, y, attacked_tasks(model, 'label'), torch.zeros(len(x), 3)).mean().item()
    print(f"\n(2) spatial search of the class loss, {len(x)} images at {size} px, angles +-{max_angle:g} deg, shifts +-{max_shift:g} px")
    print(f"    clean loss {clean:.3f}; grid {t_grid:.1f} s ({max(grids)} evaluations per image), STBO {t_bo:.1f} s ({budget})")
    print("    evaluations   grid worst case   STBO worst case")
    for n_eval in sorted(set(list(grids) + [n for n in (5, 10, 20, 30, 40, 60, 80, 100) if n <= budget])):
        g = f"{grids[n_eval].mean():.3f}" if n_eval in grids else ''
        b = f"{bo_curve[n_eval-1]:.3f}" if n_eval <= budget else ''
        print(f"    {n_eval:11d}   {g:>15}   {b:>15}")
    g_max = max(grids)
    target = 0.95*grids[g_max].mean()
    g_need = min(n for n in grids if grids[n].mean() >= target)
    b_need = first_reaching(bo_curve, target)
    b_str = f"{b_need}" if b_need else f"more than {budget}"
    print(f"    95% of the {g_max}-point grid's mean worst case ({target:.3f}): grid needs {g_need} evaluations, STBO {b_str}"
          + (f" ({b_need/g_max:.3f} of the full grid, {b_need/g_need:.3f} of the grid that reaches it; goal at most 0.1 of the grid's)" if b_need else ''))
    per_image = [first_reaching(bo_best[i], 0.95*grids[g_max][i]) for i in range(len(x))]
    reached = [p for p in per_image if p is not None]
    print(f"    per image: STBO reaches 95% of its own {g_max}-point grid worst case for {len(reached)}/{len(x)} images"
          + (f", median after {int(np.median(reached))} evaluations" if reached else ''))
    print(f"    STBO's final mean worst case is {bo_curve[-1]/grids[g_max].mean():.3f} x the {g_max}-point grid's")
    print(f"\ntotal {time.perf_counter()-t_start:.0f} s")
    return ratio, diff, b_need, g_need


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--bs', type=int, default=12); ap.add_argument('--size', type=int, default=48)
    ap.add_argument('--steps', type=int, default=10); ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--grid', type=int, default=3, help='largest grid: 2**grid + 1 points per axis (3: 9^3 = 729)')
    ap.add_argument('--budget', type=int, default=60, help='STBO evaluations per image')
    ap.add_argument('--max_angle', type=float, default=180.); ap.add_argument('--max_shift', type=float, default=4.)
    ap.add_argument('--seed', type=int, default=0)
    main(**vars(ap.parse_args()))
