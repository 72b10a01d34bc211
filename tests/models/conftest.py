"""Shared helpers for the model-library tests: tiny architectures and non-trivial random weights."""
import warnings

import pytest
import torch

# A Sequencer2d-S-shaped network small enough for millisecond forwards: same patch sizes (7, 2, 1, 1), so 28 px
# inputs give a 4x4 then 2x2 token grid; uneven depths exercise the release layout's downsample indices.
TINY = dict(layers=(2, 1, 2, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (incl. the zero-initialised head) so outputs depend on all of them."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    return model


def pytest_generate_tests(metafunc):
    """A module with ``USE_ONEDNN = "both"`` runs each test twice: on the native kernels and on oneDNN."""
    if getattr(metafunc.module, "USE_ONEDNN", False) == "both":
        metafunc.fixturenames.append("onednn")
        metafunc.parametrize("onednn", [False, True], ids=["native", "onednn"])


@pytest.fixture(autouse=True)
def _small_cpu_workload(request):
    """PyTorch's native CPU kernels unless the module sets ``USE_ONEDNN = True`` (or ``"both"``, see above).

    oneDNN builds a kernel for every new RNN shape, which costs seconds of CPU per shape, and these tests use dozens
    of tiny shapes once each; on a shared 2-core machine, intra-op threads on millisecond-sized ops mostly wait for
    each other (measured: 30x slower than one thread). Results are the same up to float rounding. The reference
    tests against timm keep oneDNN on, so the default CPU path is what is compared there.
    """
    use_onednn = getattr(request.module, "USE_ONEDNN", False)
    if use_onednn == "both":
        use_onednn = request.getfixturevalue("onednn")
    if use_onednn:
        assert torch.backends.mkldnn.enabled  # the default path users get
        yield
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # said per switch
            with torch.backends.mkldnn.flags(enabled=False):
                yield


@pytest.fixture
def tiny_kwargs():
    return dict(TINY)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """A private torch hub cache for download tests; afterwards torch.hub is as it was (no directory set: then
    $TORCH_HOME decides again, which restoring get_dir()'s value with set_dir would override for good)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    yield tmp_path / "hub"


@pytest.fixture
def randomize():
    return randomize_
