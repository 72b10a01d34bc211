import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Every test uses tiny tensors: one intra-op thread is faster, and far faster on a shared 2-core machine
    (measured 30x), where OpenMP threads on millisecond-sized ops mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
