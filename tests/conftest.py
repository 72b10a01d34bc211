import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's CPU interpreter; it must be chosen before any kernel is defined
# (sequencer.models.kernels), so here, before a test module imports the package. With CUDA they run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Every test uses tiny tensors: one intra-op thread is faster, and far faster on a shared 2-core machine
    (measured 30x), where OpenMP threads on millisecond-sized ops mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
