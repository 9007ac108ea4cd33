import os

import torch

if not torch.cuda.is_available():
    # Without a GPU, path-lm's Triton kernels run in Triton's CPU interpreter (tests/test_kernels.py). The
    # choice is read when triton is first imported, which other test modules may do while being collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")
