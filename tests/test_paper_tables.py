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

def _check_tidy(d, name):
    "A tidy results table: no missing value, every score in [0, 1], a run per config x split x seed x eval set x metric"
    fct.test_eq(d[['config', 'seed', 'eval_set', 'metric', 'value']].isna().sum().sum(), 0)
    scores = d[d.metric.str.contains('|'.join(SCORES))]
    assert scores.value.between(0, 1).all(), f"{name}: scores outside [0, 1]: {scores[~scores.value.between(0, 1)].head()}"
    keys = [c for c in ('config', 'split', 'seed', 'eval_set', 'metric', 'grid') if c in d]
    assert not d.duplicated(keys).any(), f"{name}: repeated rows for {keys}"

@pytest.mark.parametrize('name', ['16_experiments_recipe.csv', '16_experiments_recipe_128.csv'])
def test_engine_results_are_tidy(name):
    d = _table(name)
    _check_tidy(d, name)
    assert d.groupby('config').seed.nunique().ge(1).all()

def test_engine_128px_results_have_three_seeds_per_config():
    d = _table('16_experiments_recipe_128.csv')
    fct.test_eq(set(d.groupby('config').seed.nunique()), {3})
    assert d.n.between(55, 65).all()  # one stratified 20 % of Dataset 1's 300 cells per seed

@pytest.mark.parametrize('name', ['16_experiments_recipe_cells.csv', '16_experiments_recipe_128_cells.csv'])
def test_engine_cells_match_their_labels(name):
    d = _table(name)
    right = (d.label_true == d.label_pred).astype(float)
    fct.test_eq(right.to_numpy(), d.label_correct.to_numpy())
    assert d[['mask_dice_nucleus', 'mask_dice_cytoplasm']].stack().between(0, 1).all()
    assert not d.duplicated(['config', 'split', 'seed', 'image']).any()

def test_proposal_results_cover_every_model_and_source():
    d = _table('31_wbc_proposal_results.csv')
    _check_tidy(d, '31_wbc_proposal_results.csv')
    fct.test_eq(set(d.grid), {'A', 'B', 'C'})
    fct.test_eq(set(d.query("grid == 'A'").config), {'classifier', 'U-Net', 'multi-task', 'multi-task, PBC-pretrained'})
    fct.test_eq(set(d.query("grid == 'A'").fraction), {0.25, 0.5, 1.})
    fct.test_eq(set(d.query("grid == 'C'").eval_set), {'test', 'Dataset 1', 'Dataset 2'})
    assert d.groupby(['grid', 'config']).seed.nunique().ge(3).all()
    assert d.query("config == 'U-Net'").metric.str.startswith('mask').all()

def test_proposal_levers_hold_out_each_source():
    d = _table('31_wbc_proposal_levers.csv')
    _check_tidy(d, '31_wbc_proposal_levers.csv')
    test = d.query("grid == 'D'")
    fct.test_eq(set(test.held_out), {'Dataset 1', 'Dataset 2', 'PBC'})
    fct.test_eq(set(d.query("grid == 'D held-in'").config), set(test.config))
    assert test.groupby(['config', 'held_out']).seed.nunique().ge(3).all()

def test_proposal_comparisons_have_consistent_intervals():
    d = _table('31_wbc_proposal_colour.csv')
    fct.test_eq(d[['difference', 'low', 'high', 'p', 'p_holm']].isna().sum().sum(), 0)
    assert (d.low <= d.difference + 1e-9).all() and (d.difference <= d.high + 1e-9).all()
    assert (d.p <= d.p_holm + 1e-12).all() and d.p_holm.le(1).all()
    assert d[['unet', 'multi_task']].stack().between(0, 1).all()

def test_proposal_attacks_degrade_from_clean():
    d = _table('31_wbc_proposal_attacks.csv')
    fct.test_eq(set(d.config), {'classifier', 'U-Net', 'multi-task'})
    clean = d[d.setting == 'clean'].set_index(['config', 'seed'])
    strongest = d[d.setting == 'PGD 8/255'].set_index(['config', 'seed'])
    for c in ('label_correct', 'mask_dice_nucleus'):
        both = clean[c].dropna().index.intersection(strongest[c].dropna().index)
        assert len(both) and (strongest.loc[both, c] <= clean.loc[both, c] + 1e-9).all(), f"PGD 8/255 raised {c} above the clean value"
