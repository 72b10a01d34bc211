"""`sequencer models`: the table of names, parameters, GMACs, input sizes and released weights."""
import re

import pytest

from sequencer.cli import main


def _rows(out: str) -> dict[str, list[str]]:
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["model", "params"] and set(lines[1]) <= {"-", " "}
    rows = {}
    for line in lines[2:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_pattern_table(capsys):
    assert main(["models", "sequencer2d_[sml]"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["sequencer2d_l", "sequencer2d_m", "sequencer2d_s"]
    assert rows["sequencer2d_s"][:4] == ["27.65", "8.33", "3x224x224", "yes"]
    assert rows["sequencer2d_m"][0] == "38.31" and rows["sequencer2d_l"][0] == "54.30"
    assert float(rows["sequencer2d_l"][1]) == pytest.approx(16.6, rel=0.03)


def test_sizes_and_pretrained_filter(capsys):
    assert main(["models", "*392", "--sizes", "224", "448"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"GMACs@224\s+GMACs@448", out)
    rows = _rows(out)
    assert list(rows) == ["sequencer2d_l_392", "sequencer2d_m_392", "sequencer2d_s_392"]
    s392 = rows["sequencer2d_s_392"]
    assert s392[2] == "3x392x392" and s392[3] == "no"  # the 224 px release is not theirs: no weights claimed
    assert s392[4] == "8.33"  # GMACs at 224 px equal sequencer2d_s's
    assert float(s392[5]) == pytest.approx(4 * 8.33, rel=0.01)  # 4x the tokens at 448 px
    assert main(["models", "--pretrained", "*"]) == 0
    assert set(_rows(capsys.readouterr().out)) == {"sequencer2d_s", "sequencer2d_m", "sequencer2d_l"}


def test_gmacs_only_at_sizes_the_model_takes(capsys):
    """160 px is not a multiple of Sequencer2D-S's patch reduction 14 (validate and benchmark refuse it): no GMACs
    for it (its forward would drop 6 px), where 168 px is counted (12 x 12 tokens after the stem's 7 x 7 patches)."""
    assert main(["models", "sequencer2d_s", "--sizes", "160", "168"]) == 0
    out = capsys.readouterr().out
    cells = _rows(out)["sequencer2d_s"]
    assert cells[4] == "-" and float(cells[5]) == pytest.approx(8.334 * (168 / 224) ** 2, rel=1e-3)
    assert "-: the model does not take that size" in out


def test_392_models_refuse_pretrained_weights(capsys):
    # before: they silently loaded the 224 px release; validate --model NAME asks for pretrained weights too
    assert main(["validate", "--model", "sequencer2d_s_392", "--pretrained"]) == 2
    err = capsys.readouterr().err
    assert "no pretrained weights" in err and "sequencer2d_s_392" in err and "Traceback" not in err


@pytest.mark.slow
def test_every_model_listed(capsys):
    import sequencer
    assert main(["models"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == sequencer.list_models()
    assert rows["sequencer2d_nano"][2] == "3x32x32" and float(rows["sequencer2d_nano"][0]) < 2
    assert [n for n, r in rows.items() if r[3] == "yes"] == sequencer.list_models(pretrained=True)


def test_no_match_is_a_clean_error(capsys):
    assert main(["models", "resnet*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sequencer models: error: no model matches 'resnet*'") and "Traceback" not in err
