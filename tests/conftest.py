"Fixtures for the integration tests on the real datasets under $MTLROBUST_DATA"
import pytest
from mtlrobust.core import data_path, DATA_ENV

def _require(name):
    p = data_path(name)
    if p is None: pytest.skip(f"{name} not found: set {DATA_ENV} to the folder holding {name}/ to run the real-data tests")
    return p

@pytest.fixture(scope='session')
def segwbc_path(): return _require('segmentation_WBC')

@pytest.fixture(scope='session')
def pbc_path(): return _require('PBC_dataset_normal_DIB')

@pytest.fixture(scope='session')
def segwbc(segwbc_path):
    from mtlrobust.data import load_segmentation_wbc
    return load_segmentation_wbc(segwbc_path)

@pytest.fixture(scope='session')
def pbc(pbc_path):
    from mtlrobust.data import load_pbc
    return load_pbc(pbc_path)
