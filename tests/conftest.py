"""Test setup: Triton runs in its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any Triton kernel is defined (import time),
so it is set here, before the tests import starfish_fast.kernels.

On a GPU machine the interpreter stays off (the ``cuda`` tests need compiled kernels), so the
CPU tests that force Triton kernels onto CPU tensors are skipped there, and every other CPU test
sees no GPU (``torch.cuda.is_available()`` is False inside it) so that defaults such as
``device=None`` resolve to the CPU they were written for.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
INTERPRETER_TESTS = ("test_kernel_masked_linear.py", "test_kernel_cosine_loss.py", "test_kernel_masked_adam.py")


def pytest_collection_modifyitems(config, items):
    if not HAS_CUDA:
        skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run with -m cuda on a GPU machine)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip_interpreter = pytest.mark.skip(reason="Triton interpreter test (TRITON_INTERPRET is off on a GPU machine; "
                                               "the -m cuda tests cover the kernels here)")
    for item in items:
        if "cuda" not in item.keywords and item.path.name in INTERPRETER_TESTS:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _cpu_tests_see_no_gpu(request, monkeypatch):
    if HAS_CUDA and "cuda" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def compiled_graphs(monkeypatch) -> list:
    """The graphs ``nn.Module.compile`` produces from now on, counted by a backend standing in for
    inductor (fast on CPU, runs the graph as traced); dynamo's caches start empty."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend=counting_backend, **kw))
    torch._dynamo.reset()
    return graphs
