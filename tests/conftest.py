import os

import pytest
import torch


def _interpreter_runs_the_kernels() -> bool:
    """Whether this Triton's CPU interpreter runs the package's kernels: the releases from 3.6 (torch 2.11's, with
    test_kernels_triton.py's patches) to 3.9 (torch 2.15's: tests/models passed under it, 2026-12-07). 3.2's (torch
    2.6's) has no int1 type (``InterpreterBuilder.get_int1_ty``: the tiled kernel fails). Read from the installed
    metadata: Triton is not imported here. A newer Triton: try it, move the bound."""
    from importlib import metadata

    from sequencer.versions import release
    try:
        return (3, 6) <= release(metadata.version("triton")) < (3, 10)
    except metadata.PackageNotFoundError:
        return False


# Without a GPU, Triton kernels run under Triton's CPU interpreter where it runs them (elsewhere their tests skip; a GPU
# runs them: benchmarks/gpu_session.sh); it must be chosen before any kernel is defined (sequencer.models.kernels), so
# here, before a test module imports the package. With CUDA they run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1" if _interpreter_runs_the_kernels() else "0")

# Inductor's on-disk cache is keyed without custom ops' Python (pytorch#160472); the package keys its graphs on its
# kernel sources (kernels/code_key.py), but tests also monkeypatch kernels, which no source hash sees. Each run of the
# suite compiles into its own folder, inherited by the subprocesses the tests start, as a fresh CI machine would.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sequencer-tests-inductor-")


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread_for_shared_fixtures():
    """One intra-op thread (see below) from the session's start: pytest sets up module- and session-scoped fixtures
    (a run trained once for several tests) before any function-scoped one, so they trained on every core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Every test uses tiny tensors: one intra-op thread is faster, and far faster on a shared 2-core machine
    (measured 30x), where OpenMP threads on millisecond-sized ops mostly wait for each other. Per test too: a test
    (or the code it runs) that changes the count leaves the next one the same single thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_tf32():
    """fp32 matmuls and cuDNN's LSTM in true fp32 on CUDA (PyTorch's default lets them use TF32, ~1e-3 off), for
    references; restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def callers_float64_default():
    """A caller who set ``torch.set_default_dtype(torch.float64)`` (scientific code does) before the test's calls;
    the test asserts the calls gave it back, and the suite's float32 default is restored after it."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)
