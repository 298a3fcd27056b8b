"""fastai overhead of `mtl_learner.fit` against a minimal hand-written PyTorch loop.

Both train the same multi-task model (same initial weights, same optimiser settings) on the same
pre-drawn batches for the same number of steps, interleaved round by round in one process, so that
machine load affects both alike. Prints the median time ratio (goal: fastai overhead under 10%) and
the peak memory of each (CUDA allocator peak on a GPU, peak resident set size on a CPU).

    python benchmarks/bench_learner.py [--steps 20] [--rounds 5] [--size 96] [--bs 16]
"""
import argparse, copy, statistics, threading, time
import psutil, torch
from fastai.vision.all import DataLoaders, set_seed, Adam
from mtlrobust.synth import synth_wbc
from mtlrobust.data import mtl_dataloaders
from mtlrobust.learner import mtl_learner

class PeakMemory:
    "Peak memory while the block runs: CUDA allocator peak, or sampled resident set size on CPU"
    def __init__(self, device): self.device, self.peak = device, 0
    def _sample(self):
        proc = psutil.Process()
        while not self.done.wait(0.005): self.peak = max(self.peak, proc.memory_info().rss)
    def __enter__(self):
        if self.device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
        else: self.done = threading.Event(); self.thread = threading.Thread(target=self._sample); self.thread.start()
        return self
    def __exit__(self, *exc):
        if self.device.type == 'cuda': torch.cuda.synchronize(); self.peak = torch.cuda.max_memory_allocated()
        else: self.done.set(); self.thread.join()

def plain_loop(model, loss_func, batches, lr, device):
    "The minimal PyTorch training loop: forward, loss, backward, step"
    opt = torch.optim.Adam(list(model.parameters()) + list(loss_func.optim_params()), lr=lr, betas=(0.9, 0.99), eps=1e-5)
    model.train()
    for xb, *yb in batches:
        loss = loss_func(model(xb), *yb)
        loss.backward(); opt.step(); opt.zero_grad()
    if device.type == 'cuda': torch.cuda.synchronize()

class FixedBatches(list):
    "The pre-drawn batches as a fastai training 'DataLoader': one input, then the targets"
    n_inp = 1

def fastai_fit(learn, batches, lr, device):
    "`Learner.fit` for one epoch over the same batches, no validation, no progress bar"
    learn.dls = DataLoaders(FixedBatches(batches), FixedBatches(), device=device)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr)
    if device.type == 'cuda': torch.cuda.synchronize()

def main(steps=20, rounds=5, size=96, bs=16, lr=1e-3):
    set_seed(0)
    cells = synth_wbc(steps*bs, size=size, seed=0).assign(split='train')
    dls = mtl_dataloaders(cells, tasks=['label', 'mask'], size=size, bs=bs, num_workers=0)
    batches = [b for _, b in zip(range(steps), dls.train)]
    learn = mtl_learner(dls, arch="resnet18", opt_func=Adam)
    device = dls.device
    init = copy.deepcopy(learn.model.state_dict())
    times = {'fastai': [], 'plain': []}; peaks = {'fastai': 0, 'plain': 0}
    for r in range(rounds + 1):  # round 0 warms up both and is discarded
        for name in ('fastai', 'plain'):
            learn.model.load_state_dict(init); learn.opt = None
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                if name == 'fastai': fastai_fit(learn, batches, lr, device)
                else: plain_loop(learn.model, learn.loss_func, batches, lr, device)
                dt = time.perf_counter() - t0
            if r: times[name].append(dt); peaks[name] = max(peaks[name], mem.peak)
    f, p = statistics.median(times['fastai']), statistics.median(times['plain'])
    print(f"device {device}, {steps} steps of batch {bs} at {size} px, {rounds} interleaved rounds")
    print(f"plain PyTorch loop : {p:7.2f} s   peak memory {peaks['plain']/2**20:8.0f} MiB")
    print(f"mtl_learner.fit    : {f:7.2f} s   peak memory {peaks['fastai']/2**20:8.0f} MiB")
    print(f"time ratio fastai/plain: {f/p:.3f}  (overhead {100*(f/p-1):+.1f}%; goal under +10%)")
    return f/p

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=20); ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--size', type=int, default=96); ap.add_argument('--bs', type=int, default=16)
    main(**vars(ap.parse_args()))
