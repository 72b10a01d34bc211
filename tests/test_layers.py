"""The package's layers hold: pyproject.toml's import-linter contracts (docs/package.md) are kept, they cover every
module, and they do catch a wrong-way import, lazy ones included."""
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sequencer"


def _contracts() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["type"]: c for c in config["contracts"]}


def _lint(config_dir: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"],
                          cwd=config_dir, env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)


def test_import_contracts_are_kept():
    result = _lint(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_sits_in_a_layer_and_every_command_is_independent():
    contracts = _contracts()
    in_layers = {name.strip() for layer in contracts["layers"]["layers"] for name in layer.split("|")}
    top_level = {f"sequencer.{p.stem}" for p in PACKAGE.iterdir()
                 if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert top_level == in_layers
    commands = {f"sequencer.commands.{p.stem}" for p in (PACKAGE / "commands").glob("*.py")
                if p.stem not in ("__init__", "common")}
    assert commands == set(contracts["independence"]["modules"])


def test_a_lazy_upward_import_breaks_the_contract(tmp_path):
    """A copy of the package (renamed, so it cannot be confused with the installed one) where the model registry
    imports the engine inside a function: the layers contract must fail and name that import."""
    copy = tmp_path / "seqcopy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    registry = copy / "models" / "registry.py"
    registry.write_text(registry.read_text() + "\n\ndef _wrong_way():\n    from ..engine import train\n    return train\n")
    config = (ROOT / "pyproject.toml").read_text()
    start = config.index("[tool.importlinter]")
    (tmp_path / "pyproject.toml").write_text(re.sub(r"\bsequencer\b", "seqcopy", config[start:]))
    result = _lint(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "seqcopy.models.registry -> seqcopy.engine" in result.stdout, result.stdout
