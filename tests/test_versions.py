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
