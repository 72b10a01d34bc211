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
