"""train --config: keys spelled as the flags are (drop-path) or as args.yaml writes them (drop_path); unknown keys
are one clear error; --model-kwargs KEY=VALUE pairs."""
import argparse

import pytest

from sequencer.cli import main
from sequencer.commands.train import add_arguments
from sequencer.engine.config import resolve_config


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_hyphenated_and_underscored_keys_both_apply(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("drop-path: 0.2\nwarmup_epochs: 3\nmodel-kwargs: {union: add}\nlr: 0.01\n")
    cfg = resolve_config(vars(_parse(["--config", config, "--lr", "0.5"])))
    assert cfg.drop_path == 0.2 and cfg.warmup_epochs == 3 and cfg.model_kwargs == {"union": "add"}
    assert cfg.lr == 0.5  # an explicit flag still wins over the file


def test_unknown_config_key_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("drop-paht: 0.2\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "drop_paht" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_model_kwargs_pairs():
    assert _parse(["--model-kwargs", "layers=(1,1)", "union=add", "note=a=b"]).model_kwargs == \
        {"layers": (1, 1), "union": "add", "note": "a=b"}
    with pytest.raises(SystemExit):
        _parse(["--model-kwargs", "layers"])


def test_a_switch_a_resume_keeps_can_be_turned_off(capsys):
    """Each on/off flag a resume keeps from its checkpoint has an off form that counts as given (a `store_true` flag
    had none, so `--resume` could not turn off the run's `--amp` or `--model-ema`), while the on forms, the paper's
    `--native-amp` and timm's `--no-aug` keep their meaning."""
    from sequencer.engine.config import RunState
    off = ["--no-amp", "--no-model-ema", "--no-model-ema-warmup", "--no-model-ema-force-cpu", "--no-channels-last",
           "--no-grad-checkpointing", "--no-sched-on-updates", "--no-warmup-prefix", "--aug", "--no-bce-loss",
           "--no-log-wandb", "--prefetcher", "--no-torchcompile"]
    state = RunState()
    cfg = resolve_config(vars(_parse(off)), state)
    switches = ("amp", "model_ema", "model_ema_warmup", "model_ema_force_cpu", "channels_last", "grad_checkpointing",
                "sched_on_updates", "warmup_prefix", "no_aug", "bce_loss", "log_wandb", "no_prefetcher")
    assert {name: getattr(cfg, name) for name in switches} == dict.fromkeys(switches, False)
    assert cfg.torchcompile == "" and set(switches) | {"torchcompile"} <= state.given
    on = vars(_parse(["--native-amp", "--model-ema", "--no-aug", "--no-prefetcher", "--torchcompile"]))
    assert on == dict(amp=True, model_ema=True, no_aug=True, no_prefetcher=True, torchcompile="inductor")
    with pytest.raises(SystemExit):
        _parse(["--help"])
    assert "--amp, --native-amp, --no-amp\n" in capsys.readouterr().out
