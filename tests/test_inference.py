"""fuse_for_inference: the same function with the conv -> BatchNorm pairs folded."""
import copy

import pytest
import timm
import torch
from torch import nn

import mambavision  # noqa: F401
from mambavision.inference import cast_for_autocast, fuse_for_inference


def test_fuse_for_inference_matches_unfused():
    torch.manual_seed(0)
    model = timm.create_model('test_mambavision', layer_scale_conv=0.5).eval()
    for m in model.modules():  # non-trivial statistics, or folding would be the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    fused = fuse_for_inference(copy.deepcopy(model))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 1  # only the head's norm stays
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
        for a, b in zip(fused.forward_intermediates(x, intermediates_only=True),
                        model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fuse_for_inference_needs_eval_mode():
    with pytest.raises(ValueError, match='eval mode'):
        fuse_for_inference(timm.create_model('test_mambavision').train())


def test_cast_for_autocast_gives_autocast_output():
    torch.manual_seed(0)
    model = timm.create_model('test_mambavision').eval()
    cast = cast_for_autocast(copy.deepcopy(model))
    assert cast.stem.conv1.weight.dtype == torch.bfloat16
    assert cast.stages[2].blocks[0].mixer.dt_proj.weight.dtype == torch.float32
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        torch.testing.assert_close(cast(x), model(x))
