"""Time `synth_wbc` on one core: drawing and writing 1,000 cells at 96 px, then a second, cached call.

Run from the project root: `python benchmarks/bench_synth.py [--n 1000] [--size 96] [--domains A B C] [--repeat 3]`.
Each measurement starts from an empty folder; the best and the median of `--repeat` runs are printed, since other
processes on the machine (and the disk's write-back) only ever add time, with the CPU time of the best run and the
load average, to tell a slow generator from a busy machine. The goal (under 5 s for the first call)
lives here only, never in a timed unit test."""
import os
for var in ['OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMEXPR_NUM_THREADS']: os.environ[var] = '1'
import argparse, tempfile, time, platform, statistics

GOAL_S = 5.0  # seconds for the first call of 1,000 cells at 96 px

def one_core():
    "Pin this process to a single CPU core (where the OS allows it) and keep torch to one thread"
    if hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    try:
        import torch; torch.set_num_threads(1)
    except ImportError: pass

def bench(n, size, domain):
    from mtlrobust.synth import synth_wbc
    with tempfile.TemporaryDirectory() as d:
        c0, t0 = time.process_time(), time.perf_counter(); first = synth_wbc(n, size, domain, path=d)
        c1, t1 = time.process_time(), time.perf_counter(); second = synth_wbc(n, size, domain, path=d)
        t2 = time.perf_counter()
        assert first.equals(second)
    return t1 - t0, t2 - t1, c1 - c0

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=1000)
    p.add_argument('--size', type=int, default=96)
    p.add_argument('--domains', nargs='+', default=['A', 'B', 'C'])
    p.add_argument('--repeat', type=int, default=3)
    a = p.parse_args()
    one_core()
    from mtlrobust.synth import draw_cell
    draw_cell('neutrophil', a.size, 0)   # warm the caches (pixel grid, texture tile) and imports
    print(f"synth_wbc on one core ({platform.processor() or platform.machine()}), n={a.n}, size={a.size}")
    goal = GOAL_S*a.n/1000*(a.size/96)**2
    for dom in a.domains:
        firsts, cacheds, cpus = zip(*[bench(a.n, a.size, dom) for _ in range(a.repeat)])
        best, median = min(firsts), statistics.median(firsts)
        print(f"  domain {dom}: first call best {best:5.2f} s, median {median:5.2f} s  (goal < {goal:.1f} s: "
              f"{'met' if median < goal else 'MISSED'}), {1000*best/a.n:.2f} ms/cell, CPU time {min(cpus):.2f} s; "
              f"cached call {min(cacheds):.3f} s")
    if hasattr(os, 'getloadavg'):
        print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above 1 per core, other processes "
              f"share the core and stretch the wall times)")

if __name__ == '__main__': main()
