"""fuse_for_inference: the same function with the conv -> BatchNorm pairs folded."""
import copy

import pytest
import timm
import torch
from torch import nn

import mambavision  # noqa: F401
from mambavision.inference import fuse_for_inference


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
