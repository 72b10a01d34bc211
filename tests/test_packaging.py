"""The package as a user installs it: the wheel and sdist this tree builds (what they hold, their metadata against
what scripts/test_torch_range.sh tests), the wheel installed into its own environment and run outside the
repository, and the optional dependencies' absence (one line naming the extra, no traceback; `import sequencer`
needs none of them and changes nothing in the process)."""
from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import sequencer
from sequencer import cli
from sequencer.versions import release

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "sequencer"
NOT_SOURCE = (".git", ".venv", ".venvs", "build", "dist", "output", "__pycache__", "*.egg-info", ".pytest_cache")
EXPORT_EXTRA = "pip install 'sequencer-vision[export]'"


def build(hook: str, source: Path, out: Path) -> tuple[Path, str]:
    """setuptools' PEP 517 ``hook`` ("build_sdist" / "build_wheel") run in ``source``, as pip and `python -m build`
    run it (without their isolated environment: this one has setuptools); the file it built and its output."""
    out.mkdir(exist_ok=True)
    code = f"import setuptools.build_meta as backend; print(backend.{hook}({str(out)!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return out / r.stdout.strip().splitlines()[-1], r.stdout + r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist and wheel of a copy of this tree (a build in place would leave build/ and egg-info in it), the
    build's output, and the wheel the sdist builds."""
    root = tmp_path_factory.mktemp("packaging")
    tree = root / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    sdist, sdist_log = build("build_sdist", tree, root / "dist")
    wheel, wheel_log = build("build_wheel", tree, root / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    from_sdist, _ = build("build_wheel", root / "unpacked" / sdist.name.removesuffix(".tar.gz"), root / "from-sdist")
    return dict(sdist=sdist, wheel=wheel, log=sdist_log + wheel_log, wheel_from_sdist=from_sdist)


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def test_the_wheel_holds_every_module_and_the_typing_marker_and_nothing_else(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        files = {n for n in z.namelist() if ".dist-info/" not in n}
        entry_points = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    package = {f"sequencer/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")}
    # no tests, benchmarks, scripts, caches or data files: the package reads no file of its own at run time
    assert files == package | {"sequencer/py.typed"}
    assert re.search(r"^sequencer = sequencer\.cli:main$", entry_points, re.M)


def test_the_metadata_declares_the_license_python_and_the_tested_floors(built):
    meta = wheel_metadata(built["wheel"])
    assert meta["Name"] == "sequencer-vision" and meta["Version"] == sequencer.__version__
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    with zipfile.ZipFile(built["wheel"]) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE"))).decode()
    assert text == (REPO / "LICENSE").read_text() and "Apache License\n                           Version 2.0" in text
    # the README is the index's page: a relative link (docs/x.md) would lead nowhere there
    links = re.findall(r"\]\(([^)]+)\)", meta.get_payload())
    assert not [link for link in links if not link.startswith(("https://", "http://", "#"))], links
    assert meta["Requires-Python"] == ">=3.10"
    requires = meta.get_all("Requires-Dist")
    # every floor, the export extra's too: {name: declared lowest version}
    floors = {name.lower().replace("_", "-"): version for name, version, extra in
              (re.fullmatch(r'([\w-]+)>=([\d.]+)(?:; extra == "(\w+)")?', r).groups() for r in requires)
              if extra in (None, "export")}
    # the floors are what scripts/test_torch_range.sh runs the tests on (its first version of RANGE), each of them
    script = (REPO / "scripts" / "test_torch_range.sh").read_text().replace("\\\n", "")
    oldest = re.search(r"^RANGE=\((\S+)", script, re.M).group(1)
    pins = re.search(rf'^declare -A FLOOR_PINS=\(\[{re.escape(oldest)}\]="([^"]+)"\)', script, re.M).group(1)
    tested = {"torch": oldest, "torchvision": re.search(rf"\[{re.escape(oldest)}\]=(\S+?)[ )]", script).group(1),
              **dict(pin.split("==") for pin in pins.split())}
    assert set(tested) == set(floors), "a declared dependency without its floor pinned in the range script"
    for name, version in tested.items():
        assert release(version)[:len(release(floors[name]))] == release(floors[name]), \
            f"{name}>={floors[name]} declared, {version} tested"
    # the export extra is what the ONNX paths import (torch's TorchScript-based exporter needs no onnxscript)
    export = {r.split(">=")[0] for r in requires if r.endswith('extra == "export"')}
    assert export == {"onnx", "onnxruntime"}


def test_the_sdist_holds_no_partial_test_suite_and_builds_the_same_wheel(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE", "docs/package.md", "src/sequencer/__init__.py"} <= names
    assert not [n for n in names if n.startswith(("tests", "benchmarks", "scripts")) or "__pycache__" in n]

    def contents(wheel):
        with zipfile.ZipFile(wheel) as z:
            return {info.filename: info.CRC for info in z.infolist()}
    assert contents(built["wheel_from_sdist"]) == contents(built["wheel"])


def test_the_build_uses_no_deprecated_setting(built):
    # setuptools ends support for what it deprecates (the license as a TOML table: builds fail from 2027-02-18)
    assert not re.search(r"deprecat", built["log"], re.I), built["log"]


@pytest.mark.slow
def test_the_installed_wheel_runs_outside_the_repository(built, tmp_path):
    """pip installs the wheel (not editable) into a fresh environment that sees this one's dependencies; its
    command and its package run from a folder outside the repository, with nothing of src/ on the path."""
    # nothing of src/ on the path of any step: with PYTHONPATH=src, pip took the checkout for the installed wheel
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120, env=env)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=env).stdout.strip())
    # a plain path line: this environment's packages, but not the editable install's own .pth hook to src/
    (site / "dependencies.pth").write_text("\n".join(dict.fromkeys(
        sysconfig.get_paths()[key] for key in ("purelib", "platlib"))) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                    "--no-compile", "--disable-pip-version-check", built["wheel"]], check=True, timeout=300, env=env)
    image = tmp_path / "work" / "image.png"
    image.parent.mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(image)

    r = subprocess.run([venv / "bin" / "sequencer", "predict", image.name, "--model", "sequencer2d_nano",
                        "--img-size", "16", "--topk", "2"], cwd=image.parent, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r"^  \d\. .+ \(\d+\)  0\.\d{4}$", r.stdout, re.M)) == 2, r.stdout  # ImageNet's names

    # the package that ran is the wheel's (found without importing it, which would take as long as the command)
    code = "import importlib.util; print(importlib.util.find_spec('sequencer').origin)"
    r = subprocess.run([python, "-c", code], cwd=image.parent, env=env, capture_output=True, text=True, timeout=60)
    where = Path(r.stdout.strip())
    assert where.is_relative_to(site) and (where.parent / "py.typed").is_file(), r.stdout + r.stderr


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"sequencer-vision {sequencer.__version__}\n"


# ------------------------------------------------------------------------------------------ optional dependencies
def hide(monkeypatch, *packages: str) -> None:
    """Make ``packages`` unimportable for the test, as if not installed (their loaded submodules too)."""
    for name in list(sys.modules):
        if name.partition(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_onnx_export_without_the_export_extra_is_one_line_naming_it(package, tmp_path, capsys, monkeypatch):
    hide(monkeypatch, package)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "--model", "sequencer2d_nano", "--img-size", "16", "-o", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"needs the {package} package" in err and EXPORT_EXTRA in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["predict", "validate"])
def test_running_an_onnx_file_without_onnxruntime_is_one_line_naming_the_extra(command, tmp_path, capsys,
                                                                               monkeypatch):
    hide(monkeypatch, "onnxruntime")
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not read: onnxruntime is asked for first")
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a" / "x.png")
    assert cli.main([command, str(tmp_path / "images"), "--onnx", str(onnx_file)]) == 2
    err = one_line_error(capsys)
    assert "needs the onnxruntime package" in err and EXPORT_EXTRA in err


def test_an_hf_hub_name_without_huggingface_hub_is_one_line_naming_it(monkeypatch):
    """huggingface_hub is a declared dependency (timm's too), imported on first use: one a user removed is named."""
    hide(monkeypatch, "huggingface_hub")
    with pytest.raises(sequencer.SequencerError) as error:
        sequencer.create_model("hf-hub:org/name")
    assert error.value.message == "hf-hub:org/name (the Hugging Face Hub) needs the huggingface_hub package, which " \
                                  "is not installed" and error.value.hint == "pip install huggingface_hub"


def test_onnx_export_needs_no_onnxscript(tmp_path, monkeypatch):
    from sequencer.tools.export import export_onnx
    hide(monkeypatch, "onnxscript")
    model = sequencer.create_model("sequencer2d_nano", num_classes=3)
    assert export_onnx(model, tmp_path / "m.onnx", (3, 16, 16)) < 1e-4
    assert (tmp_path / "m.onnx").is_file()


def test_only_a_missing_package_becomes_the_one_line_error(tmp_path, monkeypatch):
    from sequencer.errors import SequencerError, optional_import
    with pytest.raises(SequencerError, match=r"tiling needs the seqtest_absent package, .*pip install seqtest_absent"):
        optional_import("seqtest_absent", "tiling")
    # installed but failing to import (a dependency of its own is missing): its own error, with its traceback
    (tmp_path / "seqtest_broken.py").write_text("import seqtest_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="seqtest_absent_dependency"):
        optional_import("seqtest_broken", "tiling", extra="export")


IMPORT_PROBE = """
import json, logging, os, sys, warnings
for name in ("onnx", "onnxruntime", "onnxscript", "triton", "wandb"):  # the optional packages: absent
    sys.modules[name] = None
import torch, timm, torchvision  # their own import-time changes (logging, warnings, env) are theirs

def state():
    loggers = {n: (l.level, len(l.handlers), l.propagate) for n, l in logging.root.manager.loggerDict.items()
               if isinstance(l, logging.Logger)}
    return dict(loggers=loggers, root=(logging.root.level, len(logging.root.handlers)), env=dict(os.environ),
                warnings=[repr(f) for f in warnings.filters], path=list(sys.path),
                torch=(torch.get_num_threads(), torch.get_num_interop_threads(), str(torch.get_default_dtype()),
                       torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
                       torch.backends.cudnn.benchmark, torch.backends.mkldnn.enabled, torch.is_grad_enabled()))

before, modules = state(), set(sys.modules)
import sequencer
after = state()
changed = sorted(k for k in before if before[k] != after[k] and k != "loggers")
changed += [n for n, v in after["loggers"].items() if before["loggers"].get(n, (0, 0, True)) != v]
logits = sequencer.create_model("sequencer2d_nano", num_classes=3)(torch.randn(1, 3, 16, 16))
print(json.dumps(dict(changed=changed, shape=list(logits.shape),
                      new=sorted({m.partition(".")[0] for m in set(sys.modules) - modules}),
                      lazy=sorted(m for m in sys.modules if m.startswith(("sequencer.engine", "sequencer.tools"))))))
"""


def test_import_needs_no_optional_package_is_light_and_changes_nothing(tmp_path):
    import json
    src_first = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=src_first)
    r = subprocess.run([sys.executable, "-c", IMPORT_PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["shape"] == [1, 3]
    assert seen["changed"] == []  # logging, warning filters, environment, sys.path, torch's threads and flags
    # beyond torch (its submodules), timm, torchvision and the standard library, `import sequencer` brings only
    # itself: no matplotlib, scikit-learn, onnx, ...
    assert set(seen["new"]) - set(sys.stdlib_module_names) <= {"sequencer", "torch"} and "sequencer" in seen["new"]
    assert seen["lazy"] == []  # training, evaluation and tools load on first use


def _setup_copy(tmp_path: Path) -> Path:
    """A folder holding setup.sh and pyproject.toml, with a .venv/bin/python that is the base interpreter (a
    .venv whose pyvenv.cfg is missing, as while another setup is making it)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts")
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(Path(sys.base_prefix) / "bin" / "python3")
    return tmp_path


# should setup.sh reach pip all the same, it finds nothing to install: the base interpreter stays as it was
NO_PACKAGES = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}


def test_setup_refuses_a_venv_that_is_not_one_and_installs_nothing(tmp_path):
    root = _setup_copy(tmp_path)
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, capture_output=True, text=True, timeout=60,
                       env=NO_PACKAGES)
    assert r.returncode == 1 and "is not a virtual environment's" in r.stderr and "setting up" not in r.stderr
    assert r.stderr.count("\n") == 1 and not (root / ".venv" / ".sequencer-setup").exists()


@pytest.mark.skipif(shutil.which("flock") is None, reason="no flock(1) here: setup.sh runs unlocked")
def test_a_second_setup_waits_for_the_first(tmp_path):
    import fcntl

    root = _setup_copy(tmp_path)
    with open(root / "scripts" / "setup.sh") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first setup, still running
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(["bash", "scripts/setup.sh"], cwd=root, capture_output=True, timeout=1.5, env=NO_PACKAGES)
