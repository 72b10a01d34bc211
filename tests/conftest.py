import os

import pytest
import torch

# The first and last Triton releases (any patch release) whose CPU interpreter runs the package's kernels: 3.6 (torch
# 2.11's, with test_kernels_triton.py's patches) to 3.9 (torch 2.15's: tests/models passed under it, 2026-12-07).
# 3.2's (torch 2.6's) has no int1 type (``InterpreterBuilder.get_int1_ty``: the tiled kernel fails). A newer Triton:
# try it (TRITON_INTERPRET=1), move the bound.
INTERPRETER_RUNS_THE_KERNELS = ((3, 6), (3, 9))


def _triton_version() -> str | None:
    """The installed Triton's version, read from its metadata (PyPI's ``triton``, or the nightly wheels'
    ``pytorch-triton``): Triton is not imported here. None without one."""
    from importlib import metadata

    for distribution in ("triton", "pytorch-triton"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    return None


def _interpreter_runs_the_kernels(version: str | None) -> bool:
    from sequencer.versions import release

    first, last = INTERPRETER_RUNS_THE_KERNELS
    return version is not None and first <= release(version)[:2] <= last


def triton_kernel_tests(version: str | None, cuda: bool, interpret: str | None) -> str:
    """Where the Triton kernel tests run, or why they skip, in a line: a Triton outside the interpreter's known range
    skips them all, and the skips' own reasons do not say which Triton was found."""
    known = "-".join(".".join(map(str, bound)) for bound in INTERPRETER_RUNS_THE_KERNELS) + " do"
    if cuda:
        return "Triton kernel tests: on CUDA"
    if version is None:
        return "Triton kernel tests: skipped, Triton is not installed"
    if interpret == "1":
        return f"Triton kernel tests: under Triton {version}'s CPU interpreter"
    if _interpreter_runs_the_kernels(version):
        return f"Triton kernel tests: skipped, TRITON_INTERPRET={interpret} (Triton {version}'s interpreter runs them)"
    from sequencer.versions import release

    if release(version) < INTERPRETER_RUNS_THE_KERNELS[0]:
        return f"Triton kernel tests: skipped, Triton {version}'s CPU interpreter cannot run the kernels ({known})"
    return (f"Triton kernel tests: skipped, Triton {version}'s CPU interpreter is untried with the kernels ({known}): "
            "TRITON_INTERPRET=1 tries it; move the bound in tests/conftest.py")


def pytest_terminal_summary(terminalreporter):
    """The line above at the end of a run where the kernel tests skipped (also under ``-q``)."""
    line = triton_kernel_tests(_triton_version(), torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET"))
    if "skipped" in line:
        terminalreporter.write_line(line)


# Without a GPU, Triton kernels run under Triton's CPU interpreter where it runs them (elsewhere their tests skip; a GPU
# runs them: benchmarks/gpu_session.sh); it must be chosen before any kernel is defined (sequencer.models.kernels), so
# here, before a test module imports the package. With CUDA they run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1" if _interpreter_runs_the_kernels(_triton_version()) else "0")

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
