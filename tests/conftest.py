import atexit
import os
import shutil
import tempfile

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`-n auto`): each worker loads remote code into a modules cache of its own (two
    # workers writing one module file at once would race; read when transformers is imported), and runs
    # torch on one thread (below), so that the workers do not fight over the cores.
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"hf-modules-{os.environ['PYTEST_XDIST_WORKER']}-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Without a GPU, path-lm's Triton kernels run in Triton's CPU interpreter (tests/test_kernels.py). The
    # choice is read when triton is first imported, which other test modules may do while being collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spin-waits cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
