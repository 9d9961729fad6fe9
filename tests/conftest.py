import os
import tempfile

import pytest
import torch

# every compile in the tests checks the pass invariants after each pass (see bkcompile.passes.driver)
os.environ.setdefault("BKCOMPILE_CHECK", "1")
# the cost model's kernel rates: pinned in a calibration file of the tests' own (helpers.PINNED_RATES)
os.environ["BKCOMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="bkcompile-tests-")
from helpers import pin_rates  # noqa: E402  (after the calibration file's directory is set)

pin_rates()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no cached graphs from another test)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
