"Sanity of the results tables stored beside the paper and engine notebooks (the documentation renders their numbers)"
from pathlib import Path
import numpy as np, pandas as pd, pytest
import fastcore.test as fct

NBS = Path(__file__).parent.parent/'nbs'
SCORES = ('acc', 'bacc', 'f1', 'auc', 'gmean', 'dice', 'iou', 'correct')

def _table(name):
    f = NBS/name
    if not f.exists(): pytest.skip(f"{name} is not stored yet: it is written by the notebook's full run (the `slow` cells)")
    return pd.read_csv(f)

def _check_tidy(d, name, undefined=None):
    "A tidy results table: no missing value (but where `undefined(d)` says a metric has no labels), every score in [0, 1], one row per run x eval set x metric"
    fct.test_eq(d[['config', 'seed', 'eval_set', 'metric']].isna().sum().sum(), 0)
    missing = d.value.isna() & ~(undefined(d) if undefined else False)
    assert not missing.any(), f"{name}: values missing for {d[missing][['config', 'eval_set', 'metric']].drop_duplicates().head().to_dict('records')}"
    scores = d[d.metric.str.contains('|'.join(SCORES)) & d.value.notna()]
    assert scores.value.between(0, 1).all(), f"{name}: scores outside [0, 1]: {scores[~scores.value.between(0, 1)].head()}"
    keys = [c for c in ('config', 'split', 'seed', 'eval_set', 'metric', 'grid') if c in d]
    assert not d.duplicated(keys).any(), f"{name}: repeated rows for {keys}"

def _check_comparisons(d, name, effect='effect'):
    "A comparison table: each interval contains its effect, and Holm's adjustment never lowers a p-value nor passes 1"
    assert (d.low <= d[effect] + 1e-9).all() and (d[effect] <= d.high + 1e-9).all(), name
    assert (d.p <= d.p_holm + 1e-12).all() and d.p_holm.le(1).all(), name

@pytest.mark.parametrize('name', ['16_experiments_recipe.csv', '16_experiments_recipe_128.csv', '16_experiments_recipe_128_rerun.csv'])
def test_engine_results_are_tidy(name):
    d = _table(name)
    _check_tidy(d, name)
    assert d.groupby('config').seed.nunique().ge(1).all()

@pytest.mark.parametrize('name', ['16_experiments_recipe_128.csv', '16_experiments_recipe_128_rerun.csv'])
def test_engine_128px_results_have_three_seeds_per_config(name):
    d = _table(name)
    fct.test_eq(set(d.groupby('config').seed.nunique()), {3})
    assert d.n.between(55, 65).all()  # one stratified 20 % of Dataset 1's 300 cells per seed

@pytest.mark.parametrize('name', ['16_experiments_recipe_cells.csv', '16_experiments_recipe_128_cells.csv', '16_experiments_recipe_128_rerun_cells.csv',
                                  '16_experiments_recipe_128_unseen_cells.csv'])
def test_engine_cells_match_their_labels(name):
    d = _table(name)
    right = (d.label_true == d.label_pred).astype(float)
    fct.test_eq(right.to_numpy(), d.label_correct.to_numpy())
    assert d[['mask_dice_nucleus', 'mask_dice_cytoplasm']].stack().dropna().between(0, 1).all()  # a set without masks has none
    assert not d.duplicated([c for c in ('config', 'eval_set', 'split', 'seed', 'image') if c in d]).any()

def test_engine_128px_rerun_tests_the_loops_cells():
    "The rerun's configurations are tested on the plain loop's cells, seed by seed (the comparisons pair them)"
    loop = _table('16_experiments_recipe_128_cells.csv').query("config == 'plain loop'")
    for config, g in _table('16_experiments_recipe_128_rerun_cells.csv').groupby('config'):
        fct.test_eq(sorted(zip(g.seed, g.image)), sorted(zip(loop.seed, loop.image)))

def test_engine_128px_unseen_sources_cover_the_reruns():
    d = _table('16_experiments_recipe_128_unseen.csv')
    _check_tidy(d, '16_experiments_recipe_128_unseen.csv')
    fct.test_eq(set(d.eval_set), {'Dataset 2', 'PBC'})
    reruns = set(_table('16_experiments_recipe_128_rerun.csv').config)
    fct.test_eq(set(d.config), reruns)
    assert d.groupby(['config', 'eval_set']).seed.nunique().eq(3).all()
    assert not d.query("eval_set == 'PBC'").metric.str.startswith('mask').any()  # PBC has no masks

def test_engine_128px_unseen_cells_add_up_to_the_tidy_table():
    "Every rerun is scored on the same 100 Dataset 2 and 600 PBC cells, and its per-cell scores give the stored accuracy"
    cells, tidy = _table('16_experiments_recipe_128_unseen_cells.csv'), _table('16_experiments_recipe_128_unseen.csv')
    for eval_set, n in (('Dataset 2', 100), ('PBC', 600)):
        e = cells.query('eval_set == @eval_set')
        fct.test_eq(set(e.groupby(['config', 'seed']).image.apply(frozenset)), {frozenset(e.image)})  # the same cells for every run
        fct.test_eq(e.image.nunique(), n)
    assert cells.query("eval_set == 'PBC'")[['mask_dice_nucleus', 'mask_dice_cytoplasm']].isna().all().all()
    assert cells.query("eval_set == 'Dataset 2'")[['mask_dice_nucleus', 'mask_dice_cytoplasm']].notna().all().all()
    acc = cells.groupby(['config', 'eval_set', 'seed']).label_correct.mean()
    stored = tidy.query("metric == 'label_acc'").set_index(['config', 'eval_set', 'seed']).value
    np.testing.assert_allclose(acc.sort_index().to_numpy(), stored.sort_index().to_numpy(), atol=1e-4)

def test_proposal_results_cover_every_model_and_source():
    d = _table('31_wbc_proposal_results.csv')
    _check_tidy(d, '31_wbc_proposal_results.csv', undefined=lambda d: d.metric.str.startswith('mask_') & (d.eval_set == 'PBC'))  # PBC has no masks
    fct.test_eq(set(d.grid), {'A', 'B', 'C'})
    fct.test_eq(set(d.query("grid == 'A'").config), {'classifier', 'U-Net', 'multi-task', 'multi-task, PBC-pretrained'})
    fct.test_eq(set(d.query("grid == 'A'").fraction), {0.25, 0.5, 1.})
    fct.test_eq(set(d.query("grid == 'C'").eval_set), {'test', 'Dataset 1', 'Dataset 2'})
    assert d.groupby(['grid', 'config']).seed.nunique().ge(3).all()
    assert d.query("config == 'U-Net'").metric.str.startswith('mask').all()

def test_proposal_levers_hold_out_each_source():
    d = _table('31_wbc_proposal_levers.csv')
    _check_tidy(d, '31_wbc_proposal_levers.csv', undefined=lambda d: d.metric.str.startswith('mask_') & (d.held_out == 'PBC') & (d.grid == 'D'))  # PBC has no masks
    test = d.query("grid == 'D'")
    fct.test_eq(set(test.held_out), {'Dataset 1', 'Dataset 2', 'PBC'})
    fct.test_eq(set(d.query("grid == 'D held-in'").config), set(test.config))
    assert test.groupby(['config', 'held_out']).seed.nunique().ge(3).all()

def test_proposal_comparisons_have_consistent_intervals():
    d = _table('31_wbc_proposal_colour.csv')
    fct.test_eq(d[['difference', 'low', 'high', 'p', 'p_holm']].isna().sum().sum(), 0)
    _check_comparisons(d, '31_wbc_proposal_colour.csv', effect='difference')
    assert d[['unet', 'multi_task']].stack().between(0, 1).all()

def test_proposal_attacks_degrade_from_clean():
    d = _table('31_wbc_proposal_attacks.csv')
    fct.test_eq(set(d.config), {'classifier', 'U-Net', 'multi-task'})
    clean = d[d.setting == 'clean'].set_index(['config', 'seed'])
    strongest = d[d.setting == 'PGD 8/255'].set_index(['config', 'seed'])
    for c in ('label_correct', 'mask_dice_nucleus'):
        both = clean[c].dropna().index.intersection(strongest[c].dropna().index)
        assert len(both) and (strongest.loc[both, c] <= clean.loc[both, c] + 1e-9).all(), f"PGD 8/255 raised {c} above the clean value"

def test_proposal_ood_scores_are_per_run_aurocs():
    d = _table('31_wbc_proposal_ood.csv')
    fct.test_eq(set(d.score), {'mahalanobis', 'energy'}); fct.test_eq(set(d.held_out), {'Dataset 1', 'Dataset 2', 'PBC'})
    assert d[['auroc', 'auroc_low', 'auroc_high', 'flagged_held_in', 'flagged_held_out']].stack().between(0, 1).all()
    assert (d.auroc_low <= d.auroc + 1e-9).all() and (d.auroc <= d.auroc_high + 1e-9).all()
    assert d.groupby(['config', 'score', 'held_out']).seed.nunique().ge(3).all()

def test_guided_results_cover_the_ablation():
    d = _table('32_guided_mtl_results.csv')
    # PBC's cells have no masks to measure concepts from, and their source is not one the domain head was trained on
    _check_tidy(d, '32_guided_mtl_results.csv', undefined=lambda d: d.eval_set.eq('PBC') & d.metric.str.contains('_r2_|^domain_'))
    fct.test_eq(set(d.eval_set), {'test', 'PBC'}); fct.test_eq(d.config.nunique(), 20)
    assert d.groupby('config').seed.nunique().ge(3).all()
    r2 = d[d.metric.str.contains('_r2_') & (d.eval_set == 'test')]
    assert len(r2) and r2.value.le(1).all()  # R² is at most 1 (it may be negative)

def test_guided_comparisons_have_consistent_intervals():
    for name in ('32_guided_mtl_vs_baseline.csv', '32_guided_mtl_weighting.csv'):
        d = _table(name)
        _check_comparisons(d, name)
        fct.test_eq(set(d.score), {'label_correct', 'label_p_true'})

def test_guided_probes_cover_models_layers_and_concepts():
    p = _table('32_guided_mtl_probes.csv')
    fct.test_eq(set(p.model), {'baseline', 'untrained', '+ all concepts (fixed)', '+ all concepts (uncertainty)'})
    assert p.groupby(['model', 'concept', 'layer']).seed.nunique().eq(3).all()
    assert p.r2.le(1).all() and (p.low <= p.r2 + 1e-9).all() and (p.r2 <= p.high + 1e-9).all()
    d = _table('32_guided_mtl_domain_probe.csv')
    assert d.value.between(0, 1).all() and d.chance.between(0, 1).all()
    assert d.groupby(['config', 'metric']).seed.nunique().eq(3).all() and 'baseline' in set(d.config)

def test_multidataset_cv_covers_methods_backbones_and_folds():
    d = _table('33_multidataset_cv.csv')
    _check_tidy(d, '33_multidataset_cv.csv')
    fct.test_eq(d.method.nunique(), 7); fct.test_eq(d.backbone.nunique(), 6)
    assert d.groupby(['method', 'backbone']).split.nunique().ge(3).all()
    single = d.query("method == 'single-task PBC' and eval_set == 'test'")
    assert single.metric.str.startswith('pbc_label').all()  # a single-task model scores its own task only

def test_multidataset_comparisons_pair_folds_and_backbones():
    d = _table('33_multidataset_joint_vs.csv')
    _check_comparisons(d, '33_multidataset_joint_vs.csv')
    assert d.n.le(18).all() and d.n.ge(3).all()  # pairs over 3 folds x 6 backbones at most

def test_multidataset_held_out_covers_each_source():
    d = _table('33_multidataset_held_out.csv')
    unlabelled = lambda d: (d.metric.str.startswith('mask_') & (d.held_out == 'PBC')  # PBC has no masks
                            | d.metric.str.startswith('pbc_label_') & (d.held_out != 'PBC'))  # nor segmentation_WBC eight-class labels
    _check_tidy(d, '33_multidataset_held_out.csv', undefined=unlabelled)
    fct.test_eq(set(d.held_out), {'Dataset 1', 'Dataset 2', 'PBC'}); fct.test_eq(d.backbone.nunique(), 6)
    fct.test_eq(set(d.query("held_out != 'PBC'").method), {'single-task WBC', 'joint', 'transfer PBC to WBC'})
    fct.test_eq(set(d.query("held_out == 'PBC'").method), {'single-task WBC', 'joint'})  # no PBC cell trains: no eight-class head
    assert d.groupby(['held_out', 'method']).backbone.nunique().eq(6).all()

@pytest.mark.parametrize('name, pairs', [('33_multidataset_held_out_vs.csv', 12), ('33_multidataset_held_out_pbc_vs.csv', 6)])
def test_multidataset_held_out_comparisons_pair_backbones_and_arms(name, pairs):
    d = _table(name)
    _check_comparisons(d, name)
    assert d.n.le(pairs).all()  # 6 backbones x the Dataset 1 and 2 arms; 6 backbones for held-out PBC

def test_ghamizi_rank_correlations_are_bounded():
    d = _table('34_ghamizi_rq4.csv')
    fct.test_eq(set(d.correlation), {'Pearson', 'Spearman'})
    assert d.value.between(-1, 1).all() and (d.low <= d.value + 1e-9).all() and (d.value <= d.high + 1e-9).all()
    fct.test_eq(set(d.task_sets), {8})

def test_hpat_results_cover_every_training():
    d = _table('35_hpat_leukemia_results.csv')
    _check_tidy(d, '35_hpat_leukemia_results.csv')
    fct.test_eq(d.config.nunique(), 9)  # standard + four adversarial trainings, each with and without MixBN
    assert d.groupby('config').seed.nunique().ge(3).all()

def test_hpat_hybrid_environment_rates_are_shares():
    d = _table('35_hpat_leukemia_hybrid.csv')
    assert d[['acc', 'roi']].stack().between(0, 1).all()
    h0 = d[(d.eps == 0) & (d.rotation == 0)]
    assert len(h0) and h0.roi.eq(1).all()  # nothing perturbed: every prediction is unchanged

def test_hpat_search_comparison_counts_evaluations():
    d = _table('35_hpat_leukemia_search.csv')
    fct.test_eq(set(d.search), {'STBO', 'STM'})
    assert (d.evaluations <= d.budget).all() and d.seconds.gt(0).all()

def test_hpat_paired_tests_have_consistent_intervals():
    for name in ('35_hpat_leukemia_hybrid_tests.csv', '35_hpat_leukemia_mixbn_tests.csv', '35_hpat_leukemia_search_tests.csv'):
        d = _table(name)
        _check_comparisons(d, name)

def test_hpat_clean_setting_matches_the_stored_test_accuracy():
    h = _table('35_hpat_leukemia_hybrid.csv').query("setting == 'H0'").set_index(['config', 'seed']).acc
    r = _table('35_hpat_leukemia_results.csv').query("eval_set == 'test' and metric == 'label_acc'").set_index(['config', 'seed']).value
    fct.test_eq(len(h), 27)
    np.testing.assert_allclose(h.sort_index(), r.loc[h.index].sort_index())  # H0 is the clean test set, evaluated anew

def test_hpat_roi_grid_crosses_budgets_and_rotations():
    d = _table('35_hpat_leukemia_roi_grid.csv')
    fct.test_eq(d.groupby(['config', 'seed']).size().unique(), [16])  # 4 pixel budgets x 4 rotation ranges per run
    assert d.query('eps == 0 and rotation == 0').roi.eq(1).all() and d.roi.between(0, 1).all()

def test_ghamizi_comparisons_have_consistent_intervals_and_verdicts():
    for name in ('34_ghamizi_rq1.csv', '34_ghamizi_rq3_effects.csv'):
        d = _table(name)
        _check_comparisons(d, name)
        sig = d.p_holm < 0.05  # a direction is read only where Holm calls the difference, and follows the effect's sign
        fct.test_eq(d.verdict[sig].to_numpy(), np.where(d.effect[sig] < 0, 'lower', 'higher'))
        assert d.verdict[~sig].eq('no detectable difference').all(), name

def test_ghamizi_runs_cover_settings_and_seeds():
    d = _table('34_ghamizi_results.csv')
    _check_tidy(d, '34_ghamizi_results.csv')
    fct.test_eq(d.config.nunique(), 30)
    assert d.groupby('config').seed.nunique().eq(3).all()
