import re
import subprocess
import sys

import pytest

from sequencer import cli


def test_help_lists_every_command(capsys):
    text = cli.build_parser().format_help()
    for name in cli.COMMANDS:
        assert name in text


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: sequencer" in capsys.readouterr().out


def test_every_command_module_has_the_cli_contract():
    import importlib
    for module_name, _ in cli.COMMANDS.values():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), module_name


@pytest.mark.parametrize("command", [["resolution-sweep"], ["robustness"], ["validate"], ["segment", "validate"]])
def test_evaluating_commands_say_one_workers_default(command, monkeypatch):
    """-j/--workers not given is the CPUs this process may use, at most 4, and each evaluating command's --help says
    so (resolution-sweep and robustness said only "data loading processes")."""
    import argparse
    import os

    from sequencer.commands.common import data_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert (data_workers(None), data_workers(0), data_workers(7)) == (2, 0, 7)
    parser = cli.build_parser(command[0])
    subparser = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        subparser = next(a for a in subparser._actions if isinstance(a, argparse._SubParsersAction)).choices[command[1]]
    workers = next(a for a in subparser._actions if a.dest == "workers")
    assert workers.default is None and "the CPUs this process may use, at most 4" in workers.help


_NO_TORCH_FOR_HELP = """
import sys
import sequencer
assert "torch" not in sys.modules, "import sequencer"
from sequencer import cli
calls = [["--help"], ["--version"], ["no-such-command"]]
calls += [[name, "--help"] for name in cli.COMMANDS] + [[name, "--no-such-flag"] for name in cli.COMMANDS]
calls += [["segment", "train", "--help"], ["segment", "train", "--head", "no-such-head"]]
# a command's own checks of the files it is given come before the library loads
calls += [["predict", "/no/such.jpg"], ["erf", "/no/such"], ["resolution-sweep", "/no/such", "-o", "out"]]
for argv in calls:
    try:
        cli.main(argv)
    except SystemExit:
        pass
    assert "torch" not in sys.modules, argv
"""


def test_help_and_argument_errors_import_no_torch():
    """`sequencer --help`, `sequencer COMMAND --help`, an argparse error (an unknown command or flag, a bad choice)
    and a missing input file of predict, erf and resolution-sweep import neither torch nor timm: the command line
    answers them from its argument tables and its own file checks, without seconds of imports."""
    r = subprocess.run([sys.executable, "-c", _NO_TORCH_FOR_HELP], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_user_error_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "sequencer", "validate", "--model", "sequencer2d_ss"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "unknown model 'sequencer2d_ss'" in lines[0] and "sequencer2d_s" in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_flag_is_one_line():
    r = subprocess.run([sys.executable, "-m", "sequencer", "validate", "-b", "zero"], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "-b" in r.stderr and "zero" in r.stderr


def test_sequencer_error_keeps_its_message_and_hint_apart():
    import pickle
    from sequencer.errors import SequencerError
    e = SequencerError("`batch_size=7` is too large", hint="use `batch_size=6` or less")
    assert (e.message, e.hint) == ("`batch_size=7` is too large", "use `batch_size=6` or less")
    assert str(e) == "`batch_size=7` is too large (hint: use `batch_size=6` or less)"
    assert str(SequencerError("no hint")) == "no hint" and SequencerError("no hint").hint is None
    again = pickle.loads(pickle.dumps(e))  # errors cross process boundaries (data-loader workers, torchrun)
    assert (again.message, again.hint) == (e.message, e.hint)


def test_parameters_named_in_backticks_become_the_commands_flags():
    from sequencer.commands.common import as_flags
    assert as_flags("use `batch_size=6` or less") == "use --batch-size 6 or less"
    assert as_flags("`class_map` is not supported; `resume=auto`: nothing") == \
        "--class-map is not supported; --resume auto: nothing"
    # backticked text that is no parameter (a command line, an unknown name) is left alone, paths too
    assert as_flags("run `sequencer export --format onnx`, `other=1`, /a/batch_size.txt") == \
        "run `sequencer export --format onnx`, `other=1`, /a/batch_size.txt"
    # a command with its own flag for a parameter: benchmark's `data` is --data, DATA (positional) elsewhere
    assert as_flags("`data=d`: too few images") == "DATA d: too few images"
    assert as_flags("`data=d`: too few images", "benchmark") == "--data d: too few images"


def test_library_errors_name_parameters_and_the_cli_shows_flags(capsys):
    import pytest
    import sequencer
    from sequencer.data import resolve_data_config
    from sequencer.errors import SequencerError
    model = sequencer.create_model("sequencer2d_nano", num_classes=10, img_size=16)
    with pytest.raises(SequencerError) as caught:
        resolve_data_config({"crop_pct": 5}, model)
    assert caught.value.message == "`crop_pct=5.0` must be in (0, 2] (1.0 = no crop)"
    capsys.readouterr()
    assert cli.main(["validate", "--model", "sequencer2d_nano", "--img-size", "16", "--dataset", "digits",
                     "--crop-pct", "5", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "sequencer validate: error: --crop-pct 5.0 must be in (0, 2] (1.0 = no crop)"



def _message(call) -> str:
    """The SequencerError message (and hint) ``call()`` raises, or the one warning it gives."""
    import warnings

    from sequencer.errors import SequencerError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except SequencerError as e:
            return str(e)
    assert len(caught) == 1, caught
    return str(caught[0].message)


def _device_nope(tmp):
    from sequencer.engine.inference import resolve_device
    resolve_device("nope")


def _data_not_recorded(tmp):
    """validate(checkpoint=...) of a checkpoint that records no data (written here, for the CLI call too)."""
    import torch

    import sequencer
    model = sequencer.create_model("sequencer2d_nano", num_classes=2, img_size=16)
    torch.save({"arch": model.model_name, "model_kwargs": model.model_kwargs, "class_names": ["a", "b"],
                "state_dict": model.state_dict()}, tmp / "c.pth.tar")
    sequencer.validate(checkpoint=str(tmp / "c.pth.tar"), device="cpu", workers=0, progress=False)


def _not_writable(tmp):
    import sequencer
    sequencer.train(output=str(tmp / "file" / "sub"), device="cpu", workers=0, progress=False)


def _broken_last_checkpoint(tmp):
    from sequencer.engine.checkpoint import find_auto_resume
    find_auto_resume(tmp / "run")


def _negative_warmup(tmp):
    from sequencer.tools.benchmark import BenchmarkSettings, run_benchmark
    run_benchmark(BenchmarkSettings(model="sequencer2d_nano", device="cpu", num_warmup=-1))


def _backbone_without_model(tmp):
    from sequencer.tools.backbone_benchmark import run_backbone_benchmark
    from sequencer.tools.benchmark import BenchmarkSettings
    run_backbone_benchmark(BenchmarkSettings(backbone=True, device="cpu"))


def _backbone_with_data(tmp):
    from sequencer.tools.backbone_benchmark import run_backbone_benchmark
    from sequencer.tools.benchmark import BenchmarkSettings
    run_backbone_benchmark(BenchmarkSettings(backbone=True, model="sequencer2d_nano", data=str(tmp), device="cpu"))


def _too_few_images(tmp):
    """The loader benchmark on a train split of three images: one batch of two, untimed, and none left to time
    (written here, for the CLI call too)."""
    import torch
    from PIL import Image

    from sequencer.tools.benchmark import BenchmarkSettings
    from sequencer.tools.loader_benchmark import run_loader_benchmark
    (tmp / "images" / "train" / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp / "images" / "train" / "a" / f"{i}.png")
    run_loader_benchmark(BenchmarkSettings(data=str(tmp / "images"), batch_size=2, workers=0, num_iter=1, rounds=1,
                                           device="cpu"), torch.device("cpu"), 16)


def _no_cpu_class(tmp):
    from sequencer.tools.export import int8_settings
    int8_settings("sse2")


def _missing_onnx(tmp):
    from sequencer.tools.onnx_runtime import load_onnx
    load_onnx(tmp / "missing.onnx")


# one converted message per library module: the library's text names the parameter, the CLI's the flag (argv None:
# no cheap command reaches it, the CLI's rewriting of the library's own text is checked instead)
LIBRARY_VS_CLI = {
    "engine.inference": (_device_nope, "`device='nope'` is not a device",
                         ["benchmark", "--model", "sequencer2d_nano", "--device", "nope"],
                         "--device 'nope' is not a device"),
    "engine.data_record": (_data_not_recorded, "was trained on: `data` is needed (hint: pass `data`, the images to "
                                               "evaluate the `checkpoint` on)",
                           ["validate", "--checkpoint", "{tmp}/c.pth.tar", "--device", "cpu", "-j", "0"],
                           "was trained on: DATA is needed (hint: pass DATA, the images to evaluate the --checkpoint "
                           "on)"),
    "engine.outputs": (_not_writable, "is not writable (Not a directory) (hint: pass `output=DIR` somewhere you can "
                                      "write)",
                       ["train", "--output", "{tmp}/file/sub", "--device", "cpu", "-j", "0"],
                       "is not writable (Not a directory) (hint: pass --output DIR somewhere you can write)"),
    "engine.checkpoint": (_broken_last_checkpoint, "`resume=auto`: skipping {tmp}/run/last.pth.tar: ", None,
                          "--resume auto: skipping {tmp}/run/last.pth.tar: "),
    "tools.benchmark": (_negative_warmup, "`num_warmup` and `memory_iter` must be >= 0",
                        ["benchmark", "--model", "sequencer2d_nano", "--device", "cpu", "--num-warmup", "-1"],
                        "--num-warmup and --memory-iter must be >= 0"),
    "tools.backbone_benchmark": (_backbone_without_model, "`backbone` needs `model`",
                                 ["benchmark", "--backbone", "--device", "cpu"], "--backbone needs --model"),
    # benchmark's `data` is its --data (DATA in the other commands)
    "tools.backbone_benchmark data": (_backbone_with_data, "`backbone` does not take `data`",
                                      ["benchmark", "--backbone", "--model", "sequencer2d_nano", "--data", "{tmp}",
                                       "--device", "cpu"], "--backbone does not take --data"),
    "tools.loader_benchmark": (_too_few_images, "`data`: the train split has too few images for one timed batch",
                               ["benchmark", "--data", "{tmp}/images", "-b", "2", "-j", "0", "--img-size", "16",
                                "--rounds", "1", "--num-iter", "1", "--device", "cpu"],
                               "--data: the train split has too few images for one timed batch (hint: use a smaller "
                               "--batch-size or more images)"),
    "tools.export": (_no_cpu_class, "`target_cpu='sse2'` is not a CPU class",
                     ["export", "--model", "sequencer2d_nano", "-o", "{tmp}/m.onnx", "--quantize", "int8",
                      "--target-cpu", "sse2"],
                     "--target-cpu 'sse2' is not a CPU class"),
    "tools.onnx_runtime": (_missing_onnx, "`onnx='{tmp}/missing.onnx'` does not exist",
                           ["predict", "{tmp}/file", "--onnx", "{tmp}/missing.onnx"],
                           "--onnx '{tmp}/missing.onnx' does not exist"),
}


@pytest.mark.parametrize("module", LIBRARY_VS_CLI)
def test_each_library_module_names_parameters_and_the_cli_its_flags(module, tmp_path, capsys):
    from sequencer.commands.common import as_flags
    call, library_text, argv, cli_text = LIBRARY_VS_CLI[module]
    (tmp_path / "file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pth.tar").write_bytes(b"not a checkpoint")
    library = _message(lambda: call(tmp_path))
    assert library_text.format(tmp=tmp_path) in library and not re.search(r"(?<![\w-])--\w", library), library
    cli_text = cli_text.format(tmp=tmp_path)
    if argv is None:
        assert cli_text in as_flags(library)
        return
    capsys.readouterr()
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"sequencer {argv[0]}: error: ") and cli_text in err[-1], err

def _uninstall_console_logging():
    """What install_console_logging did to the "sequencer" logger, undone (as a library user's process has it)."""
    import logging
    from sequencer.engine.guest import ConsoleHandler
    logger = logging.getLogger("sequencer")
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler) and h.thread is None]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def test_the_cli_shows_the_library_log_on_todays_streams(capsys):
    """INFO (progress, notes about the data) on stdout, WARNING on stderr, as written, with flags for parameters;
    a library user who installs nothing gets no INFO lines."""
    import logging
    log = logging.getLogger("sequencer.tools.example")
    cli.install_console_logging(__import__("sequencer.commands.common", fromlist=["as_flags"]).as_flags)
    try:
        log.info("note: skipping fog (name them with `corruptions` to include them)")
        log.warning("note: --amp-dtype bfloat16: running float32 instead")
        log.debug("not shown")
        out, err = capsys.readouterr()
        assert out == "note: skipping fog (name them with --corruptions to include them)\n"
        assert err == "note: --amp-dtype bfloat16: running float32 instead\n"
        cli.install_console_logging(str)  # a second install replaces the first: each line once
        log.info("once")
        assert capsys.readouterr().out == "once\n"
    finally:
        _uninstall_console_logging()
    log.info("a library user's process: nothing")
    assert capsys.readouterr() == ("", "")


def test_main_in_a_callers_process_gives_its_logging_and_warnings_back(capsys):
    """``main`` run from Python (a notebook, a test) installs the command's console for the command alone: the
    "sequencer" logger's handlers, level and propagation and ``warnings.formatwarning`` are as before afterwards
    (they were left set, so that a later library call in the process printed through the CLI's handler)."""
    import logging
    import warnings
    logger = logging.getLogger("sequencer")
    before = list(logger.handlers), logger.level, logger.propagate, warnings.formatwarning
    assert cli.main(["models", "sequencer2d_nano"]) == 0
    assert "sequencer2d_nano" in capsys.readouterr().out
    assert (list(logger.handlers), logger.level, logger.propagate, warnings.formatwarning) == before


def test_a_command_hides_torchs_no_cuda_runtime_note_and_only_that():
    """`--torchcompile` on a CPU machine: torch's first C++ build logs "No CUDA runtime is found, using
    CUDA_HOME=..." (expected without a GPU); a command's console drops that line alone, for the command alone."""
    import logging
    note = logging.getLogger("torch.utils.cpp_extension")
    # the lines that pass the logger, read on it: where torch's own handler writes them is torch's choice (torch 2.6's
    # writes to the sys.stderr of the time torch was imported, which capfd does not see)
    passed = logging.Handler()
    passed.emit = lambda record: lines.append(record.getMessage())
    lines = []
    note.addHandler(passed)
    try:
        with cli._command_console(str):
            note.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
            note.warning("another cpp_extension warning")
        assert lines == ["another cpp_extension warning"]
        assert not note.filters
        note.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")  # outside a command: torch's own
        assert lines[1:] == ["No CUDA runtime is found, using CUDA_HOME='/usr/local'"]
    finally:
        note.removeHandler(passed)


def test_a_printed_file_name_that_is_not_utf8_is_escaped_for_the_command_only(monkeypatch):
    """A Latin-1 name (Python holds its byte as a lone surrogate) printed by any command line is written escaped: a
    strict UTF-8 console raised UnicodeEncodeError, a traceback after the work was done. Afterwards the streams are
    strict again."""
    import io
    streams = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict") for _ in range(2)]
    monkeypatch.setattr(sys, "stdout", streams[0])
    monkeypatch.setattr(sys, "stderr", streams[1])
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")
    with cli._command_console(str):
        print(f"results written to {name}")
        print(f"note: {name}", file=sys.stderr)
    for stream in streams:
        stream.flush()
        assert stream.errors == "strict"
    assert streams[0].buffer.getvalue() == b"results written to caf\\udce9.png\n"
    assert streams[1].buffer.getvalue() == b"note: caf\\udce9.png\n"
    with pytest.raises(UnicodeEncodeError):
        print(name, file=streams[0])


def test_a_torchrun_worker_other_than_rank_0_shows_only_errors(capsys, monkeypatch):
    import logging
    log = logging.getLogger("sequencer.engine.example")
    monkeypatch.setenv("RANK", "1")
    cli.install_console_logging(str)
    try:
        log.info("epoch 0: ...")
        log.warning("note: `amp_dtype=float16`: running bfloat16 on cpu")
        log.error("rank 1 failed")
        assert capsys.readouterr() == ("", "rank 1 failed\n")
        monkeypatch.setenv("RANK", "0")
        cli.install_console_logging(str)
        log.warning("rank 0's note")
        assert capsys.readouterr() == ("", "rank 0's note\n")
    finally:
        _uninstall_console_logging()


def test_train_pretrained_failure_keeps_the_library_message_with_trains_own_hint(capsys, tmp_path):
    assert cli.main(["train", "--pretrained", "--model", "sequencer2d_nano", "--epochs", "1", "-j", "0",
                     "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sequencer train: error: --pretrained: no pretrained weights are published for 'sequencer2d_nano' (hint: "
        "download the file by other means and pass it with --initial-checkpoint FILE, or drop --pretrained)")
