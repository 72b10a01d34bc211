import numpy as np
import pytest
import torch

from sequencer.cli import main
from sequencer.tools.erf import area_ratios, display_scale, erf_maps, figure_size_px, log_scale

from .conftest import reference_inputs, reference_model
from .png_checks import assert_real_png


def test_erf_all_stages_panels_and_cross_shape(image_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "erf.png"
    assert main(["erf", str(image_folder / "val"), "--num-images", "4", "--stage", "all", "--output", str(out),
                 "--checkpoint", str(tiny_checkpoint), "-b", "2"]) == 0
    assert "high-contribution area ratio" in capsys.readouterr().out
    assert_real_png(out, figure_size_px(3))
    maps = np.load(tmp_path / "erf.npy")
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all()
    # Stage 1 is one BiLSTM2D block (patch 2, 16x16 tokens): its centre token sees only its own row and column
    # of tokens, so the receptive field is exactly a 2-pixel-wide cross through pixels 16-17.
    cross = np.zeros((32, 32), bool)
    cross[16:18, :] = cross[:, 16:18] = True
    assert (maps[0][~cross] == 0).all()
    assert (maps[0][cross] > 0).mean() > 0.5  # positive parts only: some pixels of the cross may sum to 0
    # the next block mixes rows and columns again: the whole image contributes
    assert (maps[1][~cross] > 0).mean() > 0.5
    assert area_ratios(maps[0])[0.99] < area_ratios(maps[2])[0.99]


def _two_images(image_folder, tmp_path):
    files = sorted((image_folder / "val" / "cat").glob("*.png"))[:2]
    (tmp_path / "imgs").mkdir()
    for f in files:
        (tmp_path / "imgs" / f.name).write_bytes(f.read_bytes())
    return sorted((tmp_path / "imgs").glob("*.png"))


def test_erf_default_is_the_papers_map(image_folder, tiny_checkpoint, tmp_path):
    """By hand, one image at a time: the gradient of the ReLU'd centre unit's channel sum of the final features,
    its positive part summed over images and input channels; the picture is log10(map + 1) min-max scaled."""
    files = _two_images(image_folder, tmp_path)
    out = tmp_path / "final.png"
    assert main(["erf", str(tmp_path / "imgs"), "-n", "2", "-o", str(out), "--checkpoint", str(tiny_checkpoint)]) == 0
    assert_real_png(out, figure_size_px(1))
    raw = np.load(tmp_path / "final.npy")
    model = reference_model(tiny_checkpoint)
    expected = np.zeros((32, 32))
    for x in reference_inputs(files):
        x = x[None].requires_grad_(True)
        feats = model.forward_features(x)  # (1, H, W, C), channels last
        centre = feats[0, feats.shape[1] // 2, feats.shape[2] // 2]  # (C,)
        torch.clamp(centre, min=0).sum().backward()
        expected += torch.clamp(x.grad[0], min=0).sum(0).numpy()
    assert (expected == 0).any() and expected.max() > 0  # the positive part really drops something
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-4 * expected.max())
    logged = np.log10(expected + 1)
    picture = (logged - logged.min()) / (logged.max() - logged.min())
    np.testing.assert_allclose(display_scale(raw), picture, rtol=0, atol=1e-4)


def test_erf_magnitude_mode_is_the_mean_absolute_gradient(image_folder, tiny_checkpoint, tmp_path):
    """--mode magnitude: |d sum_c feat[centre] / d input| summed over channels, averaged over images, by hand."""
    files = _two_images(image_folder, tmp_path)
    out = tmp_path / "mag.png"
    assert main(["erf", str(tmp_path / "imgs"), "-n", "2", "-o", str(out), "--checkpoint", str(tiny_checkpoint),
                 "--mode", "magnitude"]) == 0
    raw = np.load(tmp_path / "mag.npy")
    model = reference_model(tiny_checkpoint)
    expected = np.zeros((32, 32))
    for x in reference_inputs(files):
        x = x[None].requires_grad_(True)
        feats = model.forward_features(x)
        feats[0, feats.shape[1] // 2, feats.shape[2] // 2].sum().backward()
        expected += x.grad.abs().sum(1)[0].numpy() / 2
    # batched vs one-image float32 arithmetic: compare relative to the peak
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-4 * expected.max())


def test_erf_on_cuda_runs_every_batch_without_cudnn(tiny_checkpoint, monkeypatch):
    """On CUDA each batch runs with cuDNN off (its RNN cannot run backward in eval mode); its context cannot be
    entered twice, so the second batch failed (AttributeError). CUDA is faked here: the tensors stay on the CPU."""
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: to(self, "cpu") if args and
                        isinstance(args[0], torch.device) and args[0].type == "cuda" else to(self, *args, **kwargs))
    cudnn_states = []
    flags = torch.backends.cudnn.flags

    def recording_flags(**kwargs):
        cudnn_states.append(kwargs["enabled"])
        return flags(**kwargs)

    monkeypatch.setattr(torch.backends.cudnn, "flags", recording_flags)
    model = reference_model(tiny_checkpoint)
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    maps, count = erf_maps(model, iter(batches), [2], torch.device("cuda"))
    assert count == 6 and maps.shape == (1, 32, 32) and cudnn_states == [False] * 3
    expected, _ = erf_maps(model, iter(batches), [2], "cpu")
    np.testing.assert_allclose(maps, expected, rtol=1e-6)


def test_erf_on_only_unreadable_images_is_one_line(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "bad").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "bad" / name).write_bytes(b"not an image")
    out = tmp_path / "e.png"
    assert main(["erf", str(tmp_path / "bad"), "-n", "2", "-o", str(out), "--checkpoint", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "could be read" in err and "Traceback" not in err
    assert not list(tmp_path.glob("e.*"))


def test_log_scale_and_area_ratio():
    m = np.zeros((10, 10))
    m[5, 5] = 1.0
    m[5, 6] = 1e-3
    scaled = log_scale(m)
    assert scaled.max() == pytest.approx(1.0) and scaled.min() == 0.0
    assert 0 < scaled[5, 6] < 0.5
    assert area_ratios(m)[0.5] == pytest.approx(0.01)
    assert log_scale(np.zeros((2, 2))).max() == 0
    assert display_scale(np.full((2, 2), 3.0)).max() == 0  # a flat map has no range to scale


def test_erf_errors(tmp_path, tiny_checkpoint, image_folder, capsys):
    ck = ["--checkpoint", str(tiny_checkpoint)]
    assert main(["erf", str(tmp_path / "nope"), "-o", str(tmp_path / "e.png"), *ck]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["erf", str(tmp_path / "empty"), "-o", str(tmp_path / "e.png"), *ck]) == 2
    assert "no image files" in capsys.readouterr().err
    assert main(["erf", str(image_folder), "-o", str(tmp_path / "e.png"), "--stage", "9", *ck]) == 2
    assert "3 stages" in capsys.readouterr().err
    assert main(["erf", str(image_folder), "-o", str(tmp_path / "e.jpg"), *ck]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["erf", str(image_folder), "-o", str(tmp_path / "e.png")]) == 2
    assert "no model given" in capsys.readouterr().err
    assert not list(tmp_path.glob("e.*"))
    # the raw map's name a folder: refused before the work (it computed every gradient, wrote e.png, then failed)
    (tmp_path / "e.npy").mkdir()
    assert main(["erf", str(image_folder), "-o", str(tmp_path / "e.png"), *ck]) == 2
    assert f"its raw map would be {str(tmp_path / 'e.npy')!r}, which is a folder" in capsys.readouterr().err
    assert not (tmp_path / "e.png").exists()
