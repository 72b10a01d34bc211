"""Helpers of the training tests (tiny model flags, image folders, CLI runners, summary readers).

A module of its own rather than conftest.py: two conftest modules (tests/engine, tests/models) share the module name
``conftest``, so importing names from one breaks when pytest collects both folders in one run.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# sequencer2d_nano shrunk to a few thousand parameters: 16 px images, one block per stage
TINY_MODEL = ["--model", "sequencer2d_nano", "--model-kwargs", "layers=(1,1)", "patch_sizes=(2,1)",
              "embed_dims=(16,16)", "hidden_sizes=(4,4)", "mlp_ratios=(2,2)"]
# the common part of every test run: CPU, no workers, quiet logs
TINY_RUN = TINY_MODEL + ["--img-size", "16", "-b", "8", "-j", "0", "--log-interval", "1000", "--device", "cpu",
                         "--opt", "adamw", "--lr", "3e-3", "--warmup-epochs", "0", "--hflip", "0"]
# the runs a test signals (SIGKILL, SIGTERM, Ctrl-C) mid-epoch: batch 2 (24 batches of the 48 training images, 12
# per rank of two) and a log line per batch, where `held_after_batch_3` holds each process until the signal arrives.
# The tiny model: the hold, not slow steps (the full nano's once), puts the signal inside the epoch
HELD_RUN = TINY_MODEL + ["--img-size", "16", "-b", "2", "-j", "0", "--log-interval", "1", "--device", "cpu",
                         "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "--hflip", "0"]

REPO = Path(__file__).resolve().parents[2]


def make_image_folder(root: Path, classes: dict[str, tuple[int, int, int]], n_train: int, n_val: int,
                      size: int = 20, seed: int = 0) -> Path:
    """root/{train,val}/<class>/<i>.png: noisy images of one base colour per class (learnable in an epoch)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, colour in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def train_cli(args: list[str]) -> int:
    """`sequencer train ARGS` in this process (fast); returns the exit code."""
    from sequencer.cli import main
    return main(["train", *map(str, args)])


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def env_with_site(tmp_path: Path, code: str) -> dict:
    """`subprocess_env` with ``code`` run at the start of every Python process (its sitecustomize, in
    ``tmp_path/site``): a fault or a probe a test puts into the processes of a launch."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    return env


def held_after_batch_3(epoch: int) -> str:
    """Code for `env_with_site`: each `sequencer train` process (a launch's workers too, but only of its first
    start: a restart runs on) waits after the update of batch 3 of ``epoch`` (its log line "[   3/") until it is
    sent a signal, 120 s at most. A signal a test sends once it reads that line then lands there, however slowly a
    loaded machine runs the steps (the run could reach the epoch's end first, or the next epoch); one that came
    earlier ends the wait at once."""
    return f"""
import os, sys
argv = sys.orig_argv
if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "sequencer" and \\
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    import time
    from sequencer.engine import loop, stop_request
    received, handle, step = [], stop_request.StopRequest._handler, loop._Progress.step
    def noted(self, signum, frame):
        received.append(signum)
        return handle(self, signum, frame)
    def step_then_wait(self, index, *args):
        step(self, index, *args)
        deadline = time.monotonic() + 120
        while self.epoch == {epoch} and index == 2 and not received and time.monotonic() < deadline:
            time.sleep(0.01)
    stop_request.StopRequest._handler, loop._Progress.step = noted, step_then_wait
"""


def start_train(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m sequencer train ARGS` as a child process, stdout+stderr into ``log``; ``env``: the environment
    (`subprocess_env`'s when None)."""
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "sequencer", "train", *map(str, args)], stdout=out,
                            stderr=subprocess.STDOUT, env=env or subprocess_env(), cwd=REPO)


def summary_epochs(folder: Path) -> list[int]:
    with open(folder / "summary.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def summary_rows(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))
