"""The experiment engine (`mtlrobust.experiments`) on the real segmentation_WBC cells: folds, nested training
fractions, a cached grid evaluated in and out of distribution, settings that changed, interrupted runs, bad input
refused before any training, and the statistics against their textbook values."""
import json
import numpy as np, pandas as pd, pytest
import fastcore.test as fct
from scipy import stats
import mtlrobust.experiments as ex
from mtlrobust.experiments import (Config, KFold, FixedSplit, TrainingFractions, LeaveOneDomainOut, run_grid, plan_runs,
                                   load_samples, compare, compare_samples, holm, mcnemar_exact, summarise)
from mtlrobust.data import duplicate_groups, split_stratified

TINY = dict(arch='resnet10t', size=32, bs=16, epochs=1, options=dict(emb_sizes=(32,)))

@pytest.fixture(scope='module')
def domains(segwbc):
    "(Dataset 1, Dataset 2) of segmentation_WBC"
    return [segwbc[segwbc.domain.str.endswith(d)].reset_index(drop=True) for d in ('Dataset 1', 'Dataset 2')]

def no_training(monkeypatch):
    "Make any training fail, to show that a step trains nothing"
    def fail(*args, **kwargs): raise AssertionError("a run was trained")
    monkeypatch.setattr(ex, 'train_run', fail)

def test_kfold_partitions_the_cells_by_class_with_duplicates_together(domains):
    d1 = domains[0]
    splits = KFold(5).splits(d1, seed=0)
    fct.test_eq([n for n, _, _ in splits], [f'fold{i}' for i in range(5)])
    tests = np.stack([(s == 'test').to_numpy() for _, s, _ in splits])
    fct.test_eq(tests.sum(0), np.ones(len(d1)))  # every cell is tested exactly once
    counts = d1.label.value_counts()
    for _, s, _ in splits:  # stratified: each class's test cells within 1.5 of a fifth of its cells (duplicates move some)
        tested = d1.label[s == 'test'].value_counts().reindex(counts.index, fill_value=0)
        assert ((tested - counts/5).abs() <= 1.5).all(), tested.to_dict()
    groups = duplicate_groups(d1)
    for g in np.unique(groups):  # byte-identical images never straddle a train/test border
        for _, s, _ in splits: assert s[groups == g].nunique() == 1
    fct.test_eq([s.tolist() for _, s, _ in KFold(5).splits(d1, seed=3)], [s.tolist() for _, s, _ in splits])  # folds do not depend on the run's seed

def test_training_fractions_are_nested_stratified_and_keep_the_test_rows(domains):
    d1 = domains[0]
    plan = TrainingFractions((0.25, 0.5, 1.), base=KFold(5))
    for seed in (0, 1):
        runs = plan.splits(d1, seed)
        fct.test_eq(len(runs), 15)
        for fold in range(5):
            (_, s25, e25), (_, s50, _), (_, s100, _) = runs[3*fold:3*fold + 3]
            fct.test_eq(e25, {'fold': fold, 'fraction': 0.25})
            t25, t50, t100 = (set(np.flatnonzero(s == 'train')) for s in (s25, s50, s100))
            assert t25 < t50 < t100  # nested
            for s in (s25, s50): fct.test_eq((s == 'test').tolist(), (s100 == 'test').tolist())
            per_class = d1.label[s100 == 'train'].value_counts()
            fct.test_eq(d1.label[s25 == 'train'].value_counts().sort_index(), np.ceil(per_class*0.25).astype(int).sort_index())
    a, b = (set(np.flatnonzero(TrainingFractions((0.25,), base=KFold(5)).splits(d1, s)[0][1] == 'train')) for s in (0, 1))
    assert a != b  # each seed draws its own subsets
    for f in (0, 1.5, -0.2): fct.test_fail(lambda: TrainingFractions((f, 1.)), contains='outside (0, 1]')

def test_grid_on_real_cells_in_and_out_of_distribution_cached_and_resumable(domains, tmp_path, monkeypatch):
    d1, d2 = domains
    d1 = d1.assign(split=split_stratified(d1, valid_pct=0., test_pct=0.2, seed=0))
    folder, configs = tmp_path/'grid', [Config('multi-task', tasks='label,mask', **TINY)]
    res = run_grid(d1, configs, evals={'Dataset 2': d2}, folder=folder, progress=False)
    # one tidy row per run x evaluation set x metric, with the number of cells each was computed on
    fct.test_eq(sorted(res.eval_set.unique()), ['Dataset 2', 'test'])
    fct.test_eq(res.groupby('eval_set').n.first().to_dict(), {'Dataset 2': len(d2), 'test': int((d1.split == 'test').sum())})
    assert {'label_acc', 'label_bacc', 'mask_dice_nucleus', 'mask_dice_cytoplasm'} <= set(res.metric)
    fct.test_eq(len(res), 2*res.metric.nunique())
    # the per-sample predictions stored with the run agree with its metrics
    for es, n in (('test', (d1.split == 'test').sum()), ('Dataset 2', len(d2))):
        s = load_samples(folder, 'multi-task', eval_set=es)
        fct.test_eq(len(s), n)
        m = res.query('eval_set == @es').set_index('metric').value
        fct.test_close(s.label_correct.mean(), m['label_acc'], eps=1e-6)
        fct.test_close(s.mask_dice_nucleus.mean(), m['mask_dice_nucleus'], eps=1e-5)
    run = folder/'multi-task'/'fixed'/'seed0'
    fct.test_eq(json.loads((run/'settings.json').read_text())['config']['epochs'], 1)
    assert (run/'model.safetensors').exists()
    # a rerun trains nothing and returns the same table; a new evaluation set is added to the stored runs
    no_training(monkeypatch)
    pd.testing.assert_frame_equal(run_grid(d1, configs, evals={'Dataset 2': d2}, folder=folder, progress=False), res)
    more = run_grid(d1, configs, evals={'Dataset 2': d2, 'Dataset 2 head': d2.head(20)}, folder=folder, progress=False)
    fct.test_eq(more.query("eval_set == 'Dataset 2 head'").n.iloc[0], 20)
    # an evaluation set of the same name with other rows, or a configuration whose settings changed, is refused
    fct.test_fail(lambda: run_grid(d1, configs, evals={'Dataset 2': d2.head(30)}, folder=folder, progress=False), contains='other rows')
    changed = [Config('multi-task', tasks='label,mask', **{**TINY, 'epochs': 2})]
    fct.test_fail(lambda: plan_runs(d1, changed, folder=folder), contains='epochs')
    fct.test_eq(json.loads((run/'settings.json').read_text())['config']['epochs'], 1)  # nothing was overwritten

def test_an_interrupted_run_is_trained_again_and_its_leftovers_removed(domains, tmp_path, monkeypatch):
    d1 = domains[0].assign(split=split_stratified(domains[0], valid_pct=0., test_pct=0.2, seed=0))
    run = tmp_path/'grid'/'classifier'/'fixed'/'seed0'
    run.mkdir(parents=True)
    (run/'model.safetensors').write_bytes(b'cut off')  # what a run killed while saving leaves (no settings.json)
    (run/'metrics-test.json').write_text('{')
    trained = []
    real_train = ex.train_run
    monkeypatch.setattr(ex, 'train_run', lambda *a: trained.append(a[2]) or real_train(*a))
    res = run_grid(d1, [Config('classifier', tasks='label', **TINY)], folder=tmp_path/'grid', progress=False)
    fct.test_eq(trained, [0])
    assert (run/'settings.json').exists() and (run/'model.safetensors').stat().st_size > 1000
    fct.test_eq(res.query("metric == 'label_acc'").n.iloc[0], int((d1.split == 'test').sum()))

def test_bad_grids_are_refused_before_any_training(domains, tmp_path, monkeypatch):
    d1, d2 = domains
    no_training(monkeypatch)
    d1 = d1.assign(split=split_stratified(d1, valid_pct=0., test_pct=0.2, seed=0))
    grid = lambda configs, **kw: run_grid(d1 if 'table' not in kw else kw.pop('table'), configs, folder=tmp_path/'g', progress=False, **kw)
    fct.test_fail(lambda: grid([dict(name='x', tasks='label', epoch=3)]), contains="unknown keys ['epoch']")
    fct.test_fail(lambda: grid([Config('x', **TINY)], table=d1.assign(split='train')), contains='has no test rows')
    fct.test_fail(lambda: grid([Config('x', **TINY)], plan=TrainingFractions((0.5, 2.))), contains='outside (0, 1]')
    fct.test_fail(lambda: grid([Config('x', **TINY)], evals={'Dataset 2': d2.drop(columns='mask')}), contains="no columns ['mask']")
    fct.test_fail(lambda: grid([Config('x', **TINY), Config('x', **TINY)]), contains='must be unique')
    fct.test_fail(lambda: grid([Config('x', **TINY)], evals={'test': d2}), contains='reserved')
    assert not (tmp_path/'g').exists()  # nothing was written

def test_statistics_match_their_textbook_values():
    fct.test_close(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    a = np.array([1]*30 + [1]*9 + [0]*2 + [0]*9, bool)  # 9 cells only a gets right, 2 only b
    b = np.array([1]*30 + [0]*9 + [1]*2 + [0]*9, bool)
    only_a, only_b, p = mcnemar_exact(a, b)
    fct.test_eq((only_a, only_b), (9, 2))
    fct.test_close(p, stats.binomtest(9, 11, 0.5).pvalue)
    fct.test_close(p, 2*sum(stats.binom.pmf(k, 11, 0.5) for k in range(9, 12)))  # two-sided exact tail
    # 10 paired runs where a is 0.02 to 0.06 better every time: better; the same runs against themselves: no difference
    rng = np.random.default_rng(0)
    base = rng.uniform(0.7, 0.9, 10)
    rows = [dict(config=c, split=f'fold{i % 5}', seed=i // 5, eval_set='test', metric='acc', value=v)
            for c, vals in (('a', base + rng.uniform(0.02, 0.06, 10)), ('b', base)) for i, v in enumerate(vals)]
    res = pd.DataFrame(rows)
    c = compare(res, 'a', 'b').iloc[0]
    fct.test_eq((c.n, c.verdict), (10, 'better'))
    fct.test_close(c.p, stats.wilcoxon(res[res.config == 'a'].value.to_numpy() - base).pvalue)
    assert 0.02 <= c.low < c.effect < c.high <= 0.06
    fct.test_eq(compare(res, 'b', 'a').verdict.iloc[0], 'worse')
    fct.test_eq(compare(res.assign(config='a').pipe(lambda d: pd.concat([d, d.assign(config='b')])), 'a', 'b').verdict.iloc[0], 'no detectable difference')
    s = summarise(res).set_index('config')
    fct.test_close(s.loc['b', 'mean'], base.mean())
    lo, hi = stats.t.interval(0.95, 9, loc=base.mean(), scale=stats.sem(base))
    fct.test_close((s.loc['b', 'low'], s.loc['b', 'high']), (lo, hi))
