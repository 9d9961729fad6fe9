import os

import pytest
import torch

# every compile in the tests checks the pass invariants after each pass (see bkcompile.passes.driver)
os.environ.setdefault("BKCOMPILE_CHECK", "1")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no cached graphs from another test)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
