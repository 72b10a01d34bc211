"""Parameters and their gradients share one memory layout, so DDP never copies a gradient into its bucket."""
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sequencer
from sequencer.models.sequencer2d import Downsample2d

# oneDNN, the default CPU path, with more than one thread is where a 1x1 conv on a channels-last input returned its
# weight gradient channels-last; PyTorch's own kernels, or one thread, return the weight's layout either way
USE_ONEDNN = True


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_pointwise_downsample_is_the_conv_with_the_weights_layout_for_its_gradient():
    down = Downsample2d(16, 24, patch_size=1)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    y = down(x)
    reference = down.down(x.detach().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert down.down.weight.grad.stride() == down.down.weight.stride()
    assert down.down.weight.grad.shape == down.down.weight.shape


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_ddp_sees_no_gradient_of_another_layout(gloo_group, memory_format):
    # sequencer2d_nano's last downsample is a 1x1 conv: the case that used to make DDP warn and copy every step
    # (channels_last: the weights as `channels_last=True` training and timm's --channels-last lay them out)
    model = sequencer.create_model("sequencer2d_nano", num_classes=10).to(memory_format=memory_format)
    assert any(m.kernel_size == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    ddp = nn.parallel.DistributedDataParallel(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            ddp(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert not [w for w in caught if "Grad strides do not match" in str(w.message)]
    for name, param in model.named_parameters():
        assert param.grad.stride() == param.stride(), name
