"""Cost of an adversarial-training epoch relative to a clean one, next to the passes PGD-k needs at minimum.

PGD with k steps makes k forward/backward passes through the model to build the adversarial batch, then the
training step makes its own forward/backward: at least k+1 passes where clean training makes one. The passes are
not equal, though: an attack step runs the model in eval mode with frozen parameters, so its backward computes
the input gradient only (no weight gradients) and no optimiser step follows. The benchmark therefore measures the
two units side by side on the same batches, a training pass (train mode, forward and backward, no optimiser step)
and an attack step (`attack_mode`, forward and input gradient), and predicts each configuration's epoch from them:

- Madry's training on PGD-k batches (`AdversarialTraining(MultiTaskPGD(steps=k), ratio=1)`): k+1 passes at
  minimum; predicted epoch = clean epoch + k attack steps;
- the HPAT layout (the clean batch plus its PGD-k copy, `concat=True`, with MixBN routing): k+2 passes at minimum;
  predicted epoch = clean epoch + k attack steps + one training pass for the appended copy.

"overhead" is then what the callbacks cost beyond the passes they cannot avoid (slicing, concatenating, routing).

Every configuration trains a copy of the same model from the same weights on the same pre-drawn batches with
`Learner.fit` (no validation), interleaved round by round in one process so that machine load affects all alike;
the median of the rounds is reported. On a CPU the work runs on one thread (`--threads`) and the time is this
process's CPU time (`time.process_time`), which other processes on a shared machine disturb far less than the
wall-clock time (with several threads, their waits at each other count as CPU time too); on a GPU it is
wall-clock time after synchronising.

    python benchmarks/bench_adv_training.py [--ks 1 3] [--steps 3] [--rounds 3] [--size 40] [--bs 16] [--threads 1]
"""
import argparse, copy, statistics, time
import torch
from fastai.vision.all import Adam, set_seed
from mtlrobust.synth import synth_wbc
from mtlrobust.data import mtl_dataloaders
from mtlrobust.learner import mtl_learner
from mtlrobust.attacks import MultiTaskPGD, attack_mode
from mtlrobust.callbacks import AdversarialTraining, MixBN, convert_to_mixbn
from bench_learner import fastai_fit

def configs(ks):
    "name -> (callbacks factory, passes needed at minimum, attack steps, extra training passes), per clean batch"
    res = {'clean': (lambda: [], 1, 0, 0)}
    for k in ks: res[f'PGD-{k}, adversarial batch (Madry)'] = (lambda k=k: [AdversarialTraining(MultiTaskPGD(steps=k), ratio=1.)], k+1, k, 0)
    k = max(ks)
    res[f'PGD-{k}, clean + adversarial copy + MixBN (HPAT)'] = (
        lambda: [AdversarialTraining(MultiTaskPGD(steps=k), ratio=0.5, concat=True), MixBN()], k+2, k, 1)
    return res

def clock(device):
    "The timer of `device`: wall-clock on a GPU, this process's CPU time on a CPU"
    return time.perf_counter if device.type == 'cuda' else time.process_time

def timed(f, device):
    "Time of `f()` on `device`'s clock"
    now = clock(device)
    t0 = now(); f()
    if device.type == 'cuda': torch.cuda.synchronize()
    return now() - t0

def training_passes(learn, batches):
    "One training-mode forward/backward pass per batch, no optimiser step"
    model = learn.model.train()
    for xb, *yb in batches:
        learn.loss_func(model(xb), *yb).backward()
        model.zero_grad(set_to_none=True)

def attack_steps(learn, batches):
    "One attack step per batch: eval-mode forward and input gradient, parameters frozen (`attack_mode`)"
    with attack_mode(learn.model) as model:
        for xb, *yb in batches:
            x = xb.detach().clone().requires_grad_()
            torch.autograd.grad(learn.loss_func(model(x), *yb), x)

def main(ks=(1, 3), steps=3, rounds=3, size=40, bs=16, threads=1, lr=1e-3):
    if threads: torch.set_num_threads(threads)
    set_seed(0)
    cells = synth_wbc(steps*bs, size=max(size, 32), seed=0).assign(split='train')
    dls = mtl_dataloaders(cells, tasks=['label', 'mask'], size=size, bs=bs, aug=False, num_workers=0)
    batches = [b for _, b in zip(range(steps), dls.train)]
    base = mtl_learner(dls, emb_sizes=(64,), opt_func=Adam).model
    runs = {}
    for name, (cbs, *counts) in configs(ks).items():
        learn = mtl_learner(dls, emb_sizes=(64,), opt_func=Adam, cbs=cbs())
        learn.model.load_state_dict(base.state_dict())
        if any(isinstance(cb, MixBN) for cb in learn.cbs): convert_to_mixbn(learn.model)
        runs[name] = (learn, copy.deepcopy(learn.model.state_dict()), *counts)
    device, clean_learn = dls.device, runs['clean'][0]
    times = {n: [] for n in ['training pass', 'attack step', *runs]}
    for r in range(rounds + 1):  # round 0 (one batch) warms every configuration up and is discarded
        bb = batches if r else batches[:1]
        t = {'training pass': timed(lambda: training_passes(clean_learn, bb), device),
             'attack step': timed(lambda: attack_steps(clean_learn, bb), device)}
        for name, (learn, init, *_) in runs.items():
            learn.model.load_state_dict(init); learn.opt = None
            t[name] = timed(lambda: fastai_fit(learn, bb, lr, device), device)
        if r:
            for k, v in t.items(): times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    clean, t_pass, t_atk = med['clean'], med['training pass'], med['attack step']
    print(f"device {device} ({'wall-clock' if device.type == 'cuda' else 'CPU'} time), torch threads {torch.get_num_threads()}, "
          f"{steps} steps of batch {bs} at {size} px, {rounds} interleaved rounds")
    print(f"units per epoch: training pass (forward + backward) {t_pass:.2f} s, attack step (eval forward + input "
          f"gradient) {t_atk:.2f} s = {t_atk/t_pass:.2f} training pass; clean epoch {clean:.2f} s = {clean/t_pass:.2f} "
          f"training passes (with the optimiser step and fastai)")
    print(f"{'configuration':50s} {'epoch s':>8s} {'x clean':>8s} {'min passes':>10s} {'predicted s':>11s} {'overhead':>9s}")
    res = {}
    for name, (_, _, passes, k, extra) in runs.items():
        t, pred = med[name], clean + k*t_atk + extra*t_pass
        print(f"{name:50s} {t:8.2f} {t/clean:8.2f} {passes:10d} {pred:11.2f} {100*(t/pred-1):+8.1f}%")
        res[name] = t/clean
    print("x clean: epoch time over the clean epoch's; min passes: forward/backward passes per batch needed at least "
          "(k+1 for PGD-k, k+2 with the clean batch kept); predicted: clean epoch + k attack steps (+ one training "
          "pass for an appended copy); overhead: measured over predicted")
    return res

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--ks', type=int, nargs='+', default=[1, 3]); ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--rounds', type=int, default=3); ap.add_argument('--size', type=int, default=40)
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--threads', type=int, default=1, help='torch CPU threads (0: torch default)')
    main(**vars(ap.parse_args()))
