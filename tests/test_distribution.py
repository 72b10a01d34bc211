"""The installed distribution is ours, under a name of our own: `sequencer` on PyPI is an unrelated project."""
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import sequencer


def test_distribution_name_and_entry_point():
    dist = metadata.distribution("sequencer-vision")
    assert dist.version == sequencer.__version__
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"sequencer": "sequencer.cli:main"}


def test_import_package_belongs_to_our_distribution_only():
    # A second distribution providing `sequencer` (the unrelated PyPI one, or our pre-rename install) would shadow us.
    assert set(metadata.packages_distributions()["sequencer"]) == {"sequencer-vision"}


def test_console_script_runs_our_cli():
    exe = Path(sys.executable).with_name("sequencer")  # the script pip wrote beside this interpreter
    assert exe.is_file(), f"no `sequencer` command beside {sys.executable}"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "train" in r.stdout and "validate" in r.stdout
