"""The Python training API: `sequencer.train` runs what `sequencer train` runs and reports its best epoch, and
`sequencer.validate` returns what `sequencer validate` prints."""
import contextlib
import io
import json

import pytest

import sequencer
from sequencer.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Two epochs of the digits demo through the library, as its users call it (``progress=True``, the default):
    (output folder, result, what it printed). One run that the tests below read, rather than one each."""
    out = tmp_path_factory.mktemp("api")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = sequencer.train(model="sequencer2d_nano", epochs=2, output=out, experiment="demo", workers=0)
    return out, result, printed.getvalue()


def test_train_returns_the_best_epoch_and_its_files(demo_run):
    out, result, _ = demo_run
    assert result.exit_code == 0
    assert result.output_dir == out / "demo" and result.checkpoint == out / "demo" / "model_best.pth.tar"
    assert result.checkpoint.is_file() and (out / "demo" / "args.yaml").is_file()
    assert [int(r["epoch"]) for r in result.summary] == [0, 1]
    top1 = [float(r["eval_top1"]) for r in result.summary]
    assert result.best_epoch == top1.index(max(top1)) and result.best_top1 == max(top1)


def test_best_top1_is_what_validate_reports_on_the_checkpoint(demo_run, tmp_path, capsys):
    _, result, _ = demo_run
    results_file = tmp_path / "r.json"
    assert main(["validate", "--checkpoint", str(result.checkpoint), "--results-file", str(results_file)]) == 0
    from_command = json.loads(results_file.read_text())
    assert from_command["top1"] == pytest.approx(result.best_top1, abs=5e-4)
    capsys.readouterr()
    from_library = sequencer.validate(result.checkpoint, progress=False)
    assert capsys.readouterr().out == ""
    assert {k: from_library[k] for k in ("top1", "top5", "loss", "count")} == \
        {k: from_command[k] for k in ("top1", "top5", "loss", "count")}


def test_progress_is_the_commands_log(demo_run, capsys):
    """progress=True prints the command's lines; a run already finished does no work and says so, and reports the
    finished run's best epoch."""
    out, result, first = demo_run
    assert first.startswith("train: sequencer2d_nano") and "digits demo: eval top-1" in first
    again = sequencer.train(model="sequencer2d_nano", epochs=2, output=str(out), experiment="demo", workers=0,
                            resume="auto")
    assert "already finished" in capsys.readouterr().out
    assert again.output_dir == out / "demo" and again.best_top1 is not None
    assert (again.best_epoch, again.best_top1) == (result.best_epoch, result.best_top1)
    quiet = sequencer.train(model="sequencer2d_nano", epochs=2, output=str(out), experiment="demo", workers=0,
                            resume="auto", progress=False)
    assert capsys.readouterr().out == "" and quiet.best_top1 == again.best_top1


@pytest.mark.parametrize("kwargs, culprit", [(dict(epoch=2), "epoch"), (dict(lr=0.1, drop_paht=0.1), "drop_paht")])
def test_unknown_keyword_is_an_error_naming_it(kwargs, culprit, tmp_path):
    with pytest.raises(sequencer.SequencerError, match=culprit):
        sequencer.train(output=str(tmp_path), **kwargs)
    assert not any(tmp_path.iterdir())


def test_settings_are_checked_as_the_flags_are(tmp_path):
    with pytest.raises(sequencer.SequencerError, match="`epochs=0`: must be at least 1"):
        sequencer.train(epochs=0, output=str(tmp_path))
    with pytest.raises(sequencer.SequencerError, match="`dist_bn=mean`: is 'reduce'"):  # timm's names only
        sequencer.train(dist_bn="mean", output=str(tmp_path))
