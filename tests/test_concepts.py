"Integration tests of `mtlrobust.concepts` on the real segmentation_WBC data (skipped without `$MTLROBUST_DATA`)"
import time
import numpy as np, pandas as pd, pytest
import fastcore.test as fct
from mtlrobust.core import data_path
from mtlrobust.concepts import CONCEPTS, add_concepts, standardise_concepts, apply_concept_stats

ROOT = data_path('segmentation_WBC')
pytestmark = pytest.mark.skipif(ROOT is None, reason="real data absent: set MTLROBUST_DATA to the folder holding "
                                "segmentation_WBC/ (e.g. MTLROBUST_DATA=/work/shared/data)")

@pytest.fixture(scope='module')
def table():
    from mtlrobust.data import load_segmentation_wbc
    return load_segmentation_wbc(ROOT)

@pytest.fixture(scope='module')
def concepts(table):
    start = time.perf_counter()
    res = add_concepts(table)
    res.attrs['seconds'] = time.perf_counter() - start
    return res

def _dataset1(t): return t[t.domain.str.endswith('Dataset 1')]

def test_every_real_image_gets_finite_concepts(table, concepts):
    fct.test_eq(len(concepts), 400)
    fct.test_eq(list(concepts.columns), list(table.columns) + CONCEPTS)
    assert np.isfinite(concepts[CONCEPTS].to_numpy(float)).all()
    assert concepts.nucleus_area.between(0, 1).all() and concepts.nucleus_cell_ratio.between(0, 1).all()
    assert concepts[['mean_red', 'mean_green', 'mean_blue']].stack().between(0, 1).all()
    assert (concepts.nucleus_lobes >= 1).all(), "every real cell has a nucleus"
    assert concepts.attrs['seconds'] < 60, f"measuring 400 images took {concepts.attrs['seconds']:.1f}s"

def test_neutrophils_have_more_lobes_and_lower_solidity_than_lymphocytes(concepts):
    means = _dataset1(concepts).groupby('label')[['nucleus_lobes', 'nucleus_solidity']].mean()
    assert means.loc['neutrophil', 'nucleus_lobes'] > means.loc['lymphocyte', 'nucleus_lobes'], means
    assert means.loc['neutrophil', 'nucleus_solidity'] < means.loc['lymphocyte', 'nucleus_solidity'] - 0.1, means

def test_lymphocytes_have_higher_nucleus_cell_ratio_than_monocytes(concepts):
    ratio = _dataset1(concepts).groupby('label').nucleus_cell_ratio.mean()
    assert ratio['lymphocyte'] > ratio['monocyte'], ratio
    assert ratio['lymphocyte'] == ratio.max(), ratio

def test_standardising_on_one_domain_transfers_to_the_other(concepts):
    train = concepts.domain.str.endswith('Dataset 1').to_numpy()
    z = standardise_concepts(concepts, train, CONCEPTS)
    fct.test_close(z.loc[train, CONCEPTS].mean().to_numpy(), 0, eps=1e-9)
    fct.test_close(z.loc[train, CONCEPTS].std(ddof=0).to_numpy(), 1, eps=1e-9)
    test = concepts[~train]
    fct.test_close(apply_concept_stats(test, z.attrs['concept_stats'])[CONCEPTS].to_numpy(),
                   z.loc[~train, CONCEPTS].to_numpy(), eps=1e-9)
    back = apply_concept_stats(z, z.attrs['concept_stats'], inverse=True)
    fct.test_close(back[CONCEPTS].to_numpy(), concepts[CONCEPTS].to_numpy(), eps=1e-9)

def test_parallel_measurement_matches_serial(table, concepts):
    sub = table.iloc[::40]
    par = add_concepts(sub, n_workers=2)
    fct.test_close(par[CONCEPTS].to_numpy(), concepts.iloc[::40][CONCEPTS].to_numpy(), eps=1e-12)

def test_rows_without_mask_get_nan_without_reading(table):
    t = table.iloc[:3].copy()
    t['mask'] = None
    t['image'] = ['no/such/file.bmp']*3
    assert add_concepts(t)[CONCEPTS].isna().all().all()
