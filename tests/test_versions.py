"""versions.release: the one reading of a package's version string that the code and the tests compare."""
import pytest

from sequencer.versions import release


@pytest.mark.parametrize("version, expected", [
    ("1.24.1", (1, 24, 1)), ("1.23", (1, 23)), ("2.6.0+cu124", (2, 6, 0)), ("3.7.0rc1", (3, 7, 0)),
    ("2.15.0a0+git12ab", (2, 15, 0)), ("1.24.0.dev20260101", (1, 24, 0)), ("v0.29.2", (0, 29, 2))])
def test_release_reads_the_leading_numbers(version, expected):
    assert release(version) == expected


def test_release_compares_as_numbers_and_refuses_a_non_version():
    assert release("1.9.0") < release("1.24") <= release("1.24.0") < release("1.100")
    with pytest.raises(ValueError, match="not a version number: 'unknown'"):
        release("unknown")


def test_a_run_without_the_kernel_tests_says_which_triton_and_why():
    """tests/conftest.py runs the Triton kernel tests under the CPU interpreter only for the releases known to run
    them; a run that skips them says which Triton it found and why (a skip's own reason does not name it), an untried
    newer release differently from one known not to work."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("tests_root_conftest", Path(__file__).with_name("conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    line = conftest.triton_kernel_tests
    assert line("3.9.0", False, "1") == "Triton kernel tests: under Triton 3.9.0's CPU interpreter"
    assert line("3.10.0", True, "0") == "Triton kernel tests: on CUDA"
    assert line(None, False, "0") == "Triton kernel tests: skipped, Triton is not installed"
    assert line("3.2.0", False, "0") == ("Triton kernel tests: skipped, Triton 3.2.0's CPU interpreter cannot run the "
                                         "kernels (3.6-3.9 do)")
    assert line("3.10.0", False, "0") == (
        "Triton kernel tests: skipped, Triton 3.10.0's CPU interpreter is untried with the kernels (3.6-3.9 do): "
        "TRITON_INTERPRET=1 tries it; move the bound in tests/conftest.py")
    assert conftest._interpreter_runs_the_kernels("3.9.1") and not conftest._interpreter_runs_the_kernels("3.10.0")
    assert line("3.8.0", False, "0") == ("Triton kernel tests: skipped, TRITON_INTERPRET=0 (Triton 3.8.0's "
                                         "interpreter runs them)")
