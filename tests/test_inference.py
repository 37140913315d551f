"""Inference rewrites: BatchNorm folding, weights stored for autocast, and optimize_for_inference (eager and frozen)."""
import copy

import pytest
import timm
import torch
from torch import nn

import mambavision  # noqa: F401
from mambavision.inference import (
    InferenceModel, cast_for_autocast, cpu_compile_options, fuse_for_inference, optimize_for_inference)
from mambavision.ops import mixer_cpu


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


def _model_with_bn_statistics():
    torch.manual_seed(0)
    model = timm.create_model('test_mambavision').eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def test_optimize_for_inference_float32_is_the_same_function():
    model = _model_with_bn_statistics()
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        expected = model(x)
    fast = optimize_for_inference(model, dtype=None)
    assert isinstance(fast, InferenceModel) and fast.model is model  # in place
    assert model.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    y = fast(x)
    assert y.dtype == torch.float32 and not y.requires_grad
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_optimize_for_inference_bf16_runs_under_autocast():
    model = _model_with_bn_statistics()
    x = torch.randn(2, 3, 64, 48)
    reference = cast_for_autocast(fuse_for_inference(copy.deepcopy(model))).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        expected = reference(x.contiguous(memory_format=torch.channels_last))
    y = optimize_for_inference(model)(x)  # plain float32 NCHW input, no autocast or no_grad around the call
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)


def test_optimize_for_inference_rejects_other_dtypes():
    with pytest.raises(ValueError, match='dtype must be'):
        optimize_for_inference(timm.create_model('test_mambavision').eval(), dtype=torch.float64)


@pytest.mark.slow
def test_optimize_for_inference_compiles_with_freezing():
    """Inductor compiles with freezing (oneDNN's fused bf16 linear ops run); logits within 3e-2 of float32."""
    assert torch.backends.mkldnn.is_available()
    torch._dynamo.reset()
    model = _model_with_bn_statistics()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    fast = optimize_for_inference(model, compile=True, compile_options=dict(options={}))  # no CPU options
    fast(x)
    with torch.profiler.profile() as prof:
        y = fast(x)
    assert 'mkldnn::_linear_pointwise' in {e.key for e in prof.key_averages()}  # only with freezing
    assert y.dtype == torch.bfloat16
    assert ((y.float() - expected).norm() / expected.norm()).item() < 3e-2


def test_cpu_compile_options():
    """On a CPU: inductor's C++ wrapper, and in bf16 with AMX its GEMM templates; options of one's own replace them."""
    assert cpu_compile_options(None) == {'cpp_wrapper': True} == cpu_compile_options(torch.float16)
    amx = dict(max_autotune=True, max_autotune_gemm_backends='CPP') if torch.cpu._is_amx_tile_supported() else {}
    assert cpu_compile_options(torch.bfloat16) == {'cpp_wrapper': True, **amx}
    assert cpu_compile_options(torch.bfloat16, gemm_templates=False) == {'cpp_wrapper': True}

    def options(compile_options=None, device='cpu'):
        return InferenceModel(nn.Conv2d(3, 4, 3, device=device), torch.bfloat16,
                              compile_options=compile_options)._compile_options()

    assert options() == dict(dynamic=False, options=cpu_compile_options(torch.bfloat16))
    assert options(dict(dynamic=True)) == dict(dynamic=True, options=cpu_compile_options(torch.bfloat16))
    for own in (dict(mode='max-autotune'), dict(options={'freezing': True}), dict(backend='eager')):
        assert options(own) == dict(dynamic=False, **own)
    assert options(device='meta') == dict(dynamic=False)


@pytest.mark.slow
def test_optimize_for_inference_compiles_with_the_cpu_options():
    """The default compile (C++ wrapper; on AMX, inductor's GEMM templates in place of oneDNN's linears) runs and
    gives the same logits, within bf16's 3e-2 of float32."""
    torch._dynamo.reset()
    model = _model_with_bn_statistics()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    fast = optimize_for_inference(model, compile=True)
    fast(x)
    with torch.profiler.profile() as prof:
        y = fast(x)
    linears = 'mkldnn::_linear_pointwise' in {e.key for e in prof.key_averages()}
    assert linears != torch.cpu._is_amx_tile_supported()
    assert y.dtype == torch.bfloat16
    assert ((y.float() - expected).norm() / expected.norm()).item() < 3e-2


@pytest.mark.slow
@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason='the GEMM templates are asked for only with AMX')
def test_a_graph_the_gemm_templates_cannot_compile_is_compiled_without_them(monkeypatch):
    """The mixers' op path (here: as without a C compiler) has matmuls inductor's templates do not take: one
    warning, then the graph compiles with oneDNN's matmuls and gives the same logits."""
    torch._dynamo.reset()
    model = _model_with_bn_statistics()
    monkeypatch.setattr(mixer_cpu, '_kernel_limits', lambda: None)  # no fused mixer kernel: the op path
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    fast = optimize_for_inference(model, compile=True)
    with pytest.warns(UserWarning, match='cannot compile this graph with its GEMM templates'):
        y = fast(x)
    assert fast._cpu_options() == {'cpp_wrapper': True}
    assert ((y.float() - expected).norm() / expected.norm()).item() < 3e-2


def _shape_recorder(graphs):
    """A torch.compile backend that records, per compiled graph, whether its input shapes are symbolic."""
    def backend(gm, example_inputs):
        graphs.append(any(isinstance(s, torch.SymInt) for node in gm.graph.find_nodes(op='placeholder')
                          for s in getattr(node.meta.get('example_value'), 'shape', ())))
        return gm.forward
    return backend


def test_compile_gives_each_input_size_a_static_graph():
    """A second input size compiles a static graph of its own, not dynamo's slow automatic dynamic-shape one
    (which the recorder sees where ``compile_options`` ask for it: test_the_recorder_sees_dynamic_shapes)."""
    torch._dynamo.reset()
    graphs = []
    fast = optimize_for_inference(timm.create_model('test_mambavision').eval(), compile=True,
                                  compile_options=dict(backend=_shape_recorder(graphs)))
    fast(torch.randn(1, 3, 64, 64))
    fast(torch.randn(2, 3, 64, 48))
    assert graphs == [False, False]


def test_the_recorder_sees_dynamic_shapes():
    torch._dynamo.reset()
    graphs = []
    fast = InferenceModel(nn.Conv2d(3, 4, 3), compile=True,
                          compile_options=dict(backend=_shape_recorder(graphs), dynamic=None))
    fast(torch.randn(1, 3, 16, 16))
    fast(torch.randn(2, 3, 16, 12))
    assert graphs == [False, True]


def test_each_compiled_model_has_its_own_graphs_and_recompile_limit(monkeypatch):
    """dynamo keeps graphs per code object: InferenceModels sharing one would share dynamo's recompile_limit too,
    and past it (8 graphs for all models of a process) every further model or shape would silently run eagerly."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, 'recompile_limit', 2)
    counters.clear()
    models = [InferenceModel(nn.Conv2d(3, 4, 3), compile=True, compile_options=dict(backend='eager'))
              for _ in range(3)]
    for model in models:
        for size in (8, 9):
            model(torch.randn(1, 3, size, 8))
    assert counters['stats']['unique_graphs'] == 6


@pytest.mark.slow
def test_two_compiled_models_give_their_own_outputs():
    """Freezing bakes each model's weights into its graph: a second model of the same architecture must not
    be served the first one's graph (as it would be with dynamo's module guards filtered out)."""
    torch._dynamo.reset()
    first = _model_with_bn_statistics()
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1.5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = first(x), second(x)
    outputs = [optimize_for_inference(m, dtype=None, compile=True)(x) for m in (first, second)]
    for y, e in zip(outputs, expected):
        torch.testing.assert_close(y, e, rtol=1e-4, atol=1e-4)
