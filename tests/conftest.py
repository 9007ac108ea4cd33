import os

import pytest
import torch

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
