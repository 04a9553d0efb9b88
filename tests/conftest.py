import os

# Triton kernels run on CPU tensors through the interpreter in CI (no GPU there). Set before
# triton is imported anywhere; a machine with a GPU can run `TRITON_INTERPRET=0 pytest`.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # `gpu` tests skip cleanly without a CUDA device; never touch torch.cuda at import time.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
