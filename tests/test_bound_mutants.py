"""The error-bound property tests catch every deliberate mistake of tests/bound_mutants.py (a
copy of the bound code mutated once per run; the oracle comparison is not used)."""
import pytest

from bound_mutants import MUTANTS, main


@pytest.mark.slow
@pytest.mark.bound
def test_every_mutant_of_the_bound_code_is_caught():
    results = main([])
    assert len(results) == len(MUTANTS) >= 20
    survivors = [r["what"] for r in results if not r["killed"]]
    assert not survivors, survivors
