import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Profiles: `dev` for quick local runs, `ci` (deterministic) for .ci/run, `thorough` by hand.
# Select with pytest's --hypothesis-profile=NAME (or HYPOTHESIS_PROFILE in the environment).
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# The test models are tiny: intra-op threads cost more than they give (set TORCH_THREADS to change).
torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))


def pytest_configure(config):
    from bound_support import BoundSummary  # prints the error-bound summary when it has rows
    from fuzz_support import FuzzSummary  # and the fuzz suites' case counts
    config.pluginmanager.register(BoundSummary(), "skipvision-bound-summary")
    config.pluginmanager.register(FuzzSummary(), "skipvision-fuzz-summary")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def box():
    """A sandbox (tests/sandbox.py) for the fuzz suites' cases, one per test module."""
    from sandbox import Sandbox
    sandbox = Sandbox()
    yield sandbox
    sandbox.close()
