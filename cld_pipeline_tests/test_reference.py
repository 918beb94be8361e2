"""England's 153 councils: one copy in the package, used everywhere an LA or region is named."""

from pathlib import Path

import pytest

from cld_pipeline.reference import LA_CSV, load_local_authorities

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "local_authorities.csv"


def test_153_councils_in_nine_regions():
    las = load_local_authorities()
    assert len(las) == 153
    assert len(las.regions) == 9
    assert sum(la.population_18_plus for la in las) == 46_437_085
    assert sum(la.population_65_plus for la in las) == 10_981_092
    assert sum(1 for la in las if la.cld_la_code is None) == 9


def test_lookup_by_either_code():
    las = load_local_authorities()
    assert las["714"].name == "City of London"
    assert las["906"].name == "Isles of Scilly"
    assert las[" 503 "].name == "Lincolnshire"
    assert las["e06000061"].submission_code == "E06000061"   # no CASSR code: files use the ONS code
    assert las.get("999") is None and las.get(None) is None
    with pytest.raises(KeyError, match="not an English council"):
        las["123456"]


@pytest.mark.skipif(not SHARED.exists(), reason="shared/ is not beside this checkout")
def test_packaged_copy_matches_the_shared_reference():
    assert LA_CSV.read_bytes() == SHARED.read_bytes()
