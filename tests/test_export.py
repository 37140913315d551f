"""ONNX export: one graph of standard ops with dynamic batch, height and width that runs in
onnxruntime like PyTorch at other sizes than the traced one (odd, non-square: the window
padding is traced as shape arithmetic), and the ``mambavision export`` command."""
import importlib

import onnx
import pytest
import timm
import torch

import mambavision  # noqa: F401
from conftest import scan_visible_
from mambavision.cli import main
from mambavision.export import INPUT_NAME, export_onnx, max_onnx_difference, onnx_session

scan_module = importlib.import_module('mambavision.ops.selective_scan')  # the package exports the function by that name

REL_TOL = 1e-4


def _model(name='test_mambavision', **kwargs):
    """``name`` in eval mode with weights under which the scan's recurrence shows (``scan_visible_``)."""
    torch.manual_seed(0)
    return scan_visible_(timm.create_model(name, **kwargs).eval())


def _rel_difference(session, model, shape):
    x = torch.randn(shape)
    with torch.no_grad():
        scale = model(x).abs().max().item()
    return max_onnx_difference(session, model, x) / scale


@pytest.mark.parametrize('length', [1, 2, 13, 49, 196])
def test_graph_scan_matches_reference(length):
    """The ONNX form of the scan (an unrolled sweep of standard ops) == the sequential float64 loop, any length."""
    from mambavision.ops.selective_scan import selective_scan_graph, selective_scan_ref
    g = torch.Generator().manual_seed(length)
    u, delta = torch.randn(2, 2, 6, length, generator=g)
    A = -torch.rand(6, 4, generator=g) * 3
    B, C = torch.randn(2, 2, 4, length, generator=g)
    D, bias = torch.randn(2, 6, generator=g)
    y = selective_scan_graph(u, delta, A, B, C, D, bias)
    expected = selective_scan_ref(*[t.double() for t in (u, delta, A, B, C, D, bias)])
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def _backwards(scan):
    """``scan`` run from the last token to the first."""
    def wrong(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
        return scan(u.flip(-1), delta.flip(-1), A, B.flip(-1), C.flip(-1), D, delta_bias, delta_softplus).flip(-1)
    return wrong


def _memoryless(scan):
    """``scan`` whose states forget the previous one (every decay exp(dt * A * 1e4) = 0)."""
    def wrong(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
        return scan(u, delta, A * 1e4, B, C, D, delta_bias, delta_softplus)
    return wrong


@pytest.mark.parametrize('wrong_scan', [_backwards, _memoryless])
def test_model_checks_see_a_wrong_scan(wrong_scan, monkeypatch, tmp_path):
    """With ``_model``'s weights an export whose scan is wrong fails the full-model check by far."""
    model = _model()
    monkeypatch.setattr(scan_module, 'selective_scan_graph', wrong_scan(scan_module.selective_scan_graph))
    path = export_onnx(model, tmp_path / 'wrong.onnx', img_size=64, batch_size=2)
    assert _rel_difference(onnx_session(path), model, (2, 3, 64, 64)) > 10 * REL_TOL


@pytest.fixture(scope='module')
def exported_test_model(tmp_path_factory):
    model = _model()
    path = export_onnx(model, tmp_path_factory.mktemp('onnx') / 'test_mambavision.onnx', img_size=64, batch_size=2)
    return model, path, onnx_session(path)


@pytest.mark.parametrize('shape', [(2, 3, 64, 64), (1, 3, 97, 75), (3, 3, 64, 96), (1, 3, 33, 130), (2, 3, 128, 128)])
def test_onnx_dynamic_shapes_match_pytorch(exported_test_model, shape):
    model, _, session = exported_test_model
    assert _rel_difference(session, model, shape) < REL_TOL


def test_onnx_graph_is_standard_ops_with_dynamic_axes(exported_test_model):
    _, path, _ = exported_test_model
    graph = onnx.load(path).graph
    onnx.checker.check_model(onnx.load(path))
    assert {node.domain for node in graph.node} <= {'', 'ai.onnx'}  # no custom op left
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']
    assert [t.name for t in graph.input] == ['images'] and [t.name for t in graph.output] == ['logits']  # README


def test_default_exporter_also_works(tmp_path):
    """Plain ``torch.onnx.export`` (the dynamo-based exporter in recent torch): dynamic H, W at odd sizes too.

    The example batch is 2: torch 2.9.1's exporter fixes a batch of 1 in the graph (2.14.1's does not).
    """
    model = _model()
    path = tmp_path / 'default.onnx'
    torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(path), input_names=[INPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}})
    session = onnx_session(path, threads=1)
    for shape in [(2, 3, 64, 64), (3, 3, 61, 75)]:
        assert _rel_difference(session, model, shape) < REL_TOL, shape


def test_static_export_fixes_the_shape(tmp_path):
    model = _model()
    path = export_onnx(model, tmp_path / 'static.onnx', img_size=(40, 72), dynamic=False)
    dims = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 40, 72]
    assert _rel_difference(onnx_session(path), model, (1, 3, 40, 72)) < REL_TOL


def test_mambavision_t_exports_and_runs_at_another_size(tmp_path):
    """The real window sizes (14 and 7): traced at 224, run at an odd non-square size."""
    model = _model('mambavision_t')
    path = export_onnx(model, tmp_path / 't.onnx', img_size=224)
    assert _rel_difference(onnx_session(path), model, (1, 3, 197, 251)) < REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize('name', timm.list_models('mambavision*'))
def test_every_variant_exports(name, tmp_path):
    model = _model(name)
    size = model.pretrained_cfg['input_size'][-1]
    path = export_onnx(model, tmp_path / f'{name}.onnx', img_size=size)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files in ([f'{name}.onnx'], [f'{name}.onnx', f'{name}.onnx.data'])  # L3 (> 2 GB): one data file
    session = onnx_session(path)
    for shape in [(1, 3, size, size), (2, 3, size - 27, size + 29)]:
        assert _rel_difference(session, model, shape) < REL_TOL, shape


def test_export_command_end_to_end(tmp_path, capsys):
    """--checkpoint weights end up in the file, and the command reports onnxruntime vs PyTorch."""
    model = _model()
    checkpoint = tmp_path / 'weights.pth'
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / 'model.onnx'
    assert main(['export', '--model', 'test_mambavision', '--checkpoint', str(checkpoint),
                 '--output', str(out), '--img-size', '72']) == 0
    printed = capsys.readouterr().out
    assert f'wrote {out}' in printed and 'dynamic batch/height/width' in printed
    diff = float(printed.rsplit('max abs difference ', 1)[1].split()[0])
    assert 0 <= diff < 1e-4
    session = onnx_session(out)
    assert _rel_difference(session, model, (2, 3, 50, 90)) < REL_TOL  # the checkpoint's weights
    assert [t.name for t in session.get_inputs()] == ['images']
    assert [t.name for t in session.get_outputs()] == ['logits']


def test_export_command_static_opset(tmp_path, capsys):
    out = tmp_path / 'static.onnx'
    assert main(['export', '--model', 'test_mambavision', '--output', str(out), '--no-dynamic',
                 '--img-size', '48', '--opset', '18', '--random-weights']) == 0
    captured = capsys.readouterr()
    assert 'RANDOM weights' in captured.err and 'fixed 1x3x48x48' in captured.out
    model = onnx.load(out)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 48, 48]
    assert any(o.domain in ('', 'ai.onnx') and o.version == 18 for o in model.opset_import)


@pytest.mark.parametrize('argv, message', [
    (['--opset', '13'], '--opset 13: the graph needs opset 17'),
    (['--checkpoint', 'missing.pth'], 'checkpoint not found: missing.pth'),
    (['--img-size', '0'], '--img-size must be a positive integer'),
    (['--output', 'no-such-dir/x.onnx'], 'output directory does not exist'),
])
def test_export_command_bad_input_is_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / 'x.onnx'
    assert main(['export', '--model', 'test_mambavision', '--output', str(out), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_export_command_unknown_model(tmp_path, capsys):
    assert main(['export', '--model', 'mambavision_tt', '--output', str(tmp_path / 'x.onnx')]) == 1
    assert 'unknown model' in capsys.readouterr().err


def test_export_command_refuses_random_weights_unless_asked(tmp_path, capsys):
    rc = main(['export', '--model', 'test_mambavision', '--output', str(tmp_path / 'm.onnx')])
    captured = capsys.readouterr()
    assert rc != 0 and not (tmp_path / 'm.onnx').exists()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and 'no weights are published for test_mambavision' in lines[0]
    assert '--random-weights' in lines[0]
