import subprocess
import sys

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


def _uninstall_console_logging():
    """What install_console_logging did to the "sequencer" logger, undone (as a library user's process has it)."""
    import logging
    logger = logging.getLogger("sequencer")
    for handler in [h for h in logger.handlers if isinstance(h, cli.ConsoleHandler)]:
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
