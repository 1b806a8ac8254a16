"""Test setup shared by every test file.

Triton kernels run on CPU tensors in the interpreter when no GPU is present. TRITON_INTERPRET must be
set before any @triton.jit decorator runs, i.e. before a kernel module is imported: conftest is imported
first, so set it here. The AOT compile checks (marker `aot`) need TRITON_INTERPRET=0 and run in a
subprocess of their own (see tests/test_aot_compile.py).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none visible to torch (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs each run (wider coverage over runs), yet reproducible from the printed seed on failure.
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("SPARSE_ENGINE_TEST_SEED") is None \
        else int(os.environ["SPARSE_ENGINE_TEST_SEED"])
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("random seed", f"reproduce with SPARSE_ENGINE_TEST_SEED={value}"))
