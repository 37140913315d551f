"""The timm model API of MambaVision, on the tiny ``test_mambavision`` (64x64 native) and the registered variants."""
import math

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config
from timm.layers import DropPath, LayerScale
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, param_groups_layer_decay

from mambavision import ConvBlock, HybridBlock, MambaVisionMixer

ARCHS = [
    'mambavision_t', 'mambavision_t2', 'mambavision_s', 'mambavision_b', 'mambavision_l', 'mambavision_l2',
    'mambavision_l2_512', 'mambavision_l3_256', 'mambavision_l3_512']
# SPEC: tag -> (hub repo, file, input size, crop_pct, crop mode)
PUBLISHED = {
    'mambavision_t.nv_in1k': ('nvidia/MambaVision-T-1K', 'mambavision_tiny_1k.pth.tar', 224, 1.0, 'center'),
    'mambavision_t2.nv_in1k': ('nvidia/MambaVision-T2-1K', 'mambavision_tiny2_1k.pth.tar', 224, 0.98, 'center'),
    'mambavision_s.nv_in1k': ('nvidia/MambaVision-S-1K', 'mambavision_small_1k.pth.tar', 224, 0.93, 'center'),
    'mambavision_b.nv_in1k': ('nvidia/MambaVision-B-1K', 'mambavision_base_1k.pth.tar', 224, 1.0, 'center'),
    'mambavision_b.nv_in21k_ft_in1k': ('nvidia/MambaVision-B-21K', 'mambavision_base_21k.pth.tar', 224, 1.0, 'center'),
    'mambavision_l.nv_in1k': ('nvidia/MambaVision-L-1K', 'mambavision_large_1k.pth.tar', 224, 1.0, 'center'),
    'mambavision_l.nv_in21k_ft_in1k': (
        'nvidia/MambaVision-L-21K', 'mambavision_large_21k.pth.tar', 224, 1.0, 'center'),
    'mambavision_l2.nv_in1k': ('nvidia/MambaVision-L2-1K', 'mambavision_large2_1k.pth.tar', 224, 1.0, 'center'),
    'mambavision_l2_512.nv_in21k_ft_in1k': (
        'nvidia/MambaVision-L2-512-21K', 'mambavision_L2_21k_240m_512.pth.tar', 512, 0.93, 'squash'),
    'mambavision_l3_256.nv_in21k_ft_in1k': (
        'nvidia/MambaVision-L3-256-21K', 'mambavision_L3_21k_740m_256.pth.tar', 256, 1.0, 'center'),
    'mambavision_l3_512.nv_in21k_ft_in1k': (
        'nvidia/MambaVision-L3-512-21K', 'mambavision_L3_21k_740m_512.pth.tar', 512, 0.93, 'squash'),
}
# SPEC: arch -> (dim, drop path rate, layer scale)
SPEC_ARCH = {
    'mambavision_t': (80, 0.2, None), 'mambavision_t2': (80, 0.2, None), 'mambavision_s': (96, 0.2, None),
    'mambavision_b': (128, 0.3, 1e-5), 'mambavision_l': (196, 0.3, 1e-5), 'mambavision_l2': (196, 0.3, 1e-5),
    'mambavision_l2_512': (196, 0.3, 1e-5), 'mambavision_l3_256': (256, 0.5, 1e-5),
    'mambavision_l3_512': (256, 0.5, 1e-5),
}
DIM = 16  # test_mambavision: dim 16, depths (1, 1, 2, 2)


def _model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('test_mambavision', **kwargs).eval()


def _image(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _stage_sizes(n):
    sizes = [math.ceil(math.ceil(n / 2) / 2)]
    for _ in range(3):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def _blocks(model):
    return [block for stage in model.stages for block in stage.blocks]


# --- registration and pretrained configs ---

def test_registered_architectures():
    assert timm.list_models('mambavision*') == sorted(ARCHS)
    assert 'test_mambavision' in timm.list_models()


def test_published_tags_and_configs():
    dense = {'nv_coco', 'nv_ade20k', 'nv_in21k_ade20k_640'}  # tests/test_dense_backbone.py
    assert sorted(t for t in timm.list_pretrained('mambavision*') if t.split('.')[1] not in dense) == sorted(PUBLISHED)
    for tag, (repo, filename, size, crop_pct, crop_mode) in PUBLISHED.items():
        cfg = timm.models.get_pretrained_cfg(tag)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == (repo, filename), tag
        assert cfg.input_size == (3, size, size) and cfg.crop_pct == crop_pct and cfg.crop_mode == crop_mode, tag
        assert cfg.interpolation == 'bicubic' and cfg.num_classes == 1000, tag
        assert tuple(cfg.mean) == IMAGENET_DEFAULT_MEAN and tuple(cfg.std) == IMAGENET_DEFAULT_STD, tag
        assert (cfg.first_conv, cfg.classifier) == ('stem.conv1', 'head.fc'), tag
        assert cfg.license == 'cc-by-nc-sa-4.0', tag  # the weights' licence


@pytest.mark.parametrize('arch', ARCHS)
def test_registered_arch_matches_spec(arch):
    dim, drop_path_rate, layer_scale = SPEC_ARCH[arch]
    with torch.device('meta'):
        model = timm.create_model(arch)
    assert model.stem.conv1.in_channels == 3 and model.get_classifier().out_features == 1000
    assert model.num_features == 8 * dim and model.feature_info[0]['num_chs'] == dim
    rates = [b.drop_path.drop_prob if isinstance(b, ConvBlock) else b.drop_path1.drop_prob for b in _blocks(model)[1:]]
    assert rates[-1] == pytest.approx(drop_path_rate)
    hybrid = [b for b in _blocks(model) if isinstance(b, HybridBlock)]
    if layer_scale is None:
        assert not any(isinstance(b.ls1, LayerScale) for b in hybrid)
    else:
        assert all(b.ls1.init_values == b.ls2.init_values == layer_scale for b in hybrid)


def test_data_config_is_the_published_preprocessing():
    with torch.device('meta'):
        model = timm.create_model('mambavision_l3_512')
    cfg = resolve_model_data_config(model)
    assert cfg['input_size'] == (3, 512, 512) and cfg['crop_pct'] == 0.93 and cfg['crop_mode'] == 'squash'
    assert cfg['interpolation'] == 'bicubic'
    assert tuple(cfg['mean']) == IMAGENET_DEFAULT_MEAN and tuple(cfg['std']) == IMAGENET_DEFAULT_STD
    timm.data.create_transform(**cfg, is_training=False)


def test_test_model_config():
    model = _model()
    assert model.pretrained_cfg['input_size'] == (3, 64, 64)
    assert dict(model.named_modules())[model.pretrained_cfg['first_conv']] is model.stem.conv1
    assert dict(model.named_modules())[model.pretrained_cfg['classifier']] is model.get_classifier()


# --- forward, head and classifier ---

def test_forward_features_is_normed_last_stage():
    model = _model()
    x = _image(2, 3, 64, 64)
    with torch.no_grad():
        model.norm.running_mean.normal_()  # a fresh norm is nearly the identity in eval mode
        feats = model.forward_features(x)
        last = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
        assert feats.shape == (2, 8 * DIM, 2, 2)
        assert torch.allclose(feats, model.norm(last), atol=1e-6)
        assert not torch.allclose(feats, last, atol=1e-2)
        pre = model.forward_head(feats, pre_logits=True)
        assert torch.allclose(pre, feats.mean((2, 3)), atol=1e-6)
        assert torch.allclose(model(x), model.get_classifier()(pre), atol=1e-6)


def test_reset_classifier():
    model = _model()
    x = _image(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(7)
        assert model.num_classes == 7 and model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert torch.allclose(model(x), feats.mean((2, 3)), atol=1e-6)
        model.reset_classifier(5, global_pool='max')
        assert torch.allclose(model.forward_head(feats, pre_logits=True), feats.amax((2, 3)))
        model.reset_classifier(0, global_pool='')
        assert torch.allclose(model(x), feats)


@pytest.mark.parametrize('batch, size', [(1, (33, 47)), (5, (17, 17)), (2, (1, 1)), (1, (70, 90)), (2, (64, 64))])
def test_any_input_size_and_batch(batch, size):
    model = _model()
    x = _image(batch, 3, *size)
    with torch.no_grad():
        out = model(x)
        stages = model.forward_intermediates(x, intermediates_only=True)
        assert out.shape == (batch, 1000) and torch.isfinite(out).all()
        heights, widths = _stage_sizes(size[0]), _stage_sizes(size[1])
        assert [tuple(s.shape) for s in stages] == [
            (batch, DIM * 2 ** i, heights[i], widths[i]) for i in range(4)]
        # samples do not see each other (windows and padding are per sample)
        for i in range(batch):
            assert torch.allclose(model(x[i:i + 1]), out[i:i + 1], atol=1e-5)


def test_channels_last_input():
    model = _model()
    x = _image(2, 3, 45, 61)
    with torch.no_grad():
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), model(x), atol=1e-5)


@pytest.mark.parametrize('size', [(28, 28), (45, 61)])  # one window per stage (batch 1), then several
def test_memory_layouts_between_stages(size):
    """Windowed blocks get tokens-first memory and stages hand on (B, C, H, W)-contiguous maps, whatever the count
    of windows: a one-window view in channels-first order made every LayerNorm copy and the next conv reorder its
    weights (CPU, float32 eager at batch 1)."""
    model = _model()
    block_inputs = []
    for stage in model.stages[2:]:
        stage.blocks[0].register_forward_pre_hook(lambda m, args: block_inputs.append(args[0]))
    with torch.no_grad():
        stages = model.forward_intermediates(_image(1, 3, *size), intermediates_only=True)
    assert len(block_inputs) == 2 and all(x.is_contiguous() for x in block_inputs)
    assert all(s.is_contiguous() for s in stages)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_other_input_channels(in_chans):
    model = _model(in_chans=in_chans)
    assert model(_image(2, in_chans, 40, 40)).shape == (2, 1000)


@pytest.mark.parametrize('num_classes', [0, 7])
def test_num_classes(num_classes):
    out = _model(num_classes=num_classes)(_image(2, 3, 64, 64))
    assert out.shape == (2, num_classes or 8 * DIM)


@pytest.mark.parametrize('x, what', [
    (torch.zeros(3, 64, 64), '(3, 64, 64)'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), 'torch.uint8'),
    (torch.zeros(1, 1, 64, 64), '(1, 1, 64, 64)'),
    ([[0.]], 'list'),
])
def test_bad_input_is_a_one_line_value_error(x, what):
    model = _model()
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError) as info:
            call(x)
        message = str(info.value)
        assert what in message and '(B, 3, H, W)' in message and '\n' not in message


# --- intermediates, pruning and feature extraction ---

def test_forward_intermediates():
    model = _model()
    x = _image(2, 3, 70, 90)
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [s.shape[1] for s in stages] == [DIM, 2 * DIM, 4 * DIM, 8 * DIM]
        assert [s.shape[2:] for s in stages] == [(18, 23), (9, 12), (5, 6), (3, 3)]

        for indices, taken in [(2, [2, 3]), (1, [3]), ([0, 2], [0, 2]), ([-1], [3]), ([-4, -2], [0, 2])]:
            got = model.forward_intermediates(x, indices=indices, intermediates_only=True)
            assert len(got) == len(taken) and all(torch.equal(g, stages[i]) for g, i in zip(got, taken)), indices

        _, normed = model.forward_intermediates(x, indices=[2, 3], norm=True)
        assert torch.equal(normed[0], stages[2]) and torch.equal(normed[1], final)

        nhwc = model.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        assert all(torch.equal(a, b.permute(0, 2, 3, 1)) for a, b in zip(nhwc, stages))
        with pytest.raises(ValueError, match='output_fmt'):
            model.forward_intermediates(x, output_fmt='NLC')


def test_forward_intermediates_stop_early():
    model = _model()
    x = _image(1, 3, 64, 64)
    ran = []
    model.stages[2].register_forward_hook(lambda *args: ran.append(2))
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        ran.clear()
        last, stages = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
    assert ran == []
    assert torch.equal(stages[0], full[0]) and torch.equal(stages[1], full[1]) and torch.equal(last, full[1])


def test_prune_intermediate_layers():
    model = _model()
    x = _image(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2 and model.num_classes == 0
        pruned = model.forward_intermediates(x, intermediates_only=True)
        assert len(pruned) == 2 and all(torch.equal(a, b) for a, b in zip(pruned, full))

        model = _model()
        model.prune_intermediate_layers([3], prune_norm=False, prune_head=True)
        assert len(model.stages) == 4 and isinstance(model.norm, torch.nn.BatchNorm2d)
        assert torch.equal(model(x), model.forward_features(x))  # no pooling, no classifier (timm's convention)


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 3)])
def test_features_only(out_indices):
    reference = _model(num_classes=0)  # features_only models have no classifier (and so draw the same init)
    torch.manual_seed(0)
    model = timm.create_model('test_mambavision', features_only=True, out_indices=out_indices).eval()
    assert model.feature_info.channels() == [DIM * 2 ** i for i in out_indices]
    assert model.feature_info.reduction() == [4 * 2 ** i for i in out_indices]
    x = _image(2, 3, 64, 64)
    with torch.no_grad():
        maps = model(x)
        expected = reference.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    assert len(maps) == len(out_indices)
    for m, e, i in zip(maps, expected, out_indices):
        assert m.shape == (2, DIM * 2 ** i, 64 // 4 // 2 ** i, 64 // 4 // 2 ** i)
        assert torch.equal(m, e)


def test_features_only_full_size_feature_info():
    with torch.device('meta'):
        model = timm.create_model('mambavision_t', features_only=True)
    assert model.feature_info.channels() == [80, 160, 320, 640]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_mambavision_t_at_224():
    torch.manual_seed(0)
    model = timm.create_model('mambavision_t').eval()
    with torch.no_grad():
        final, stages = model.forward_intermediates(_image(1, 3, 224, 224))
        logits = model.forward_head(final)
    assert [tuple(s.shape) for s in stages] == [(1, 80, 56, 56), (1, 160, 28, 28), (1, 320, 14, 14), (1, 640, 7, 7)]
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


# --- training features ---

def _counting(fn, calls):
    def forward(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return forward


def test_grad_checkpointing_recomputes_blocks_with_equal_training_step():
    """Hybrid blocks are recomputed in backward; gradients and BatchNorm statistics equal those without it."""
    x = _image(2, 3, 40, 40)
    grads, buffers, counts = [], [], []
    for enable in (False, True):
        model = _model().train()
        model.set_grad_checkpointing(enable)
        calls = []
        for block in _blocks(model):  # count forward runs (module hooks do not see checkpoint recomputation)
            block.forward = _counting(block.forward, calls)
        model(x).square().sum().backward()
        counts.append(len(calls))
        grads.append({n: p.grad for n, p in model.named_parameters()})
        buffers.append(dict(model.named_buffers()))
        with torch.no_grad():  # no recomputation without gradients
            calls.clear()
            model(x)
            assert len(calls) == len(_blocks(model))
    hybrid = sum(isinstance(b, HybridBlock) for b in _blocks(model))
    assert counts == [len(_blocks(model)), len(_blocks(model)) + hybrid]
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-5, atol=1e-7), name
    for name, buffer in buffers[0].items():  # BatchNorm statistics are updated once per step
        assert torch.equal(buffers[1][name], buffer), name


@pytest.mark.parametrize('kwargs', [dict(drop_path_rate=0.5), dict(drop_rate=0.5)])
def test_stochastic_depth_and_dropout_only_in_training(kwargs):
    x = _image(2, 3, 64, 64)
    model = _model(**kwargs)
    control = _model()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        control.train()
        assert torch.equal(control(x), control(x))
        assert not torch.equal(model(x), model(x))


def test_drop_path_rates_rise_linearly():
    model = _model(drop_path_rate=0.3)
    rates = []
    for block in _blocks(model):
        drop = block.drop_path if isinstance(block, ConvBlock) else block.drop_path1
        rates.append(drop.drop_prob if isinstance(drop, DropPath) else 0.)
        if isinstance(block, HybridBlock):
            assert type(block.drop_path2) is type(drop)
    assert rates == pytest.approx(torch.linspace(0, 0.3, len(rates)).tolist())


def test_group_matcher_with_timm():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sorted(n for g in groups.values() for n in g) == sorted(names)
        assert groups[0] == [n for n in names if n.startswith('stem.')]
    fine = group_parameters(model, model.group_matcher())
    assert len(fine) == 1 + len(_blocks(model)) + 1  # stem, one per block (+ downsample, final norm), head
    layer_of = {}
    for group in param_groups_layer_decay(model, layer_decay=0.5, weight_decay=0.05):
        for p in group['params']:
            layer_of[p] = group['lr_scale']
    params = dict(model.named_parameters())
    assert layer_of[params['stem.conv1.weight']] < layer_of[params['stages.2.blocks.0.mixer.A_log']]
    assert layer_of[params['stages.2.blocks.0.mixer.A_log']] < layer_of[params['stages.3.blocks.1.mlp.fc1.weight']]
    assert layer_of[params['head.fc.weight']] == 1.


def test_no_weight_decay_on_a_log_and_d():
    model = _model()
    mixers = [n for n, m in model.named_modules() if isinstance(m, MambaVisionMixer)]
    expected = {f'{n}.{p}' for n in mixers for p in ('A_log', 'D')}
    assert len(mixers) == 2 and model.no_weight_decay() == expected
    optimizer = create_optimizer_v2(model, 'adamw', weight_decay=0.05)
    decayed = {p for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    params = dict(model.named_parameters())
    assert all(params[n] not in decayed for n in expected)
    assert params['stages.2.blocks.0.mixer.in_proj.weight'] in decayed


def test_initialisation():
    model = _model(layer_scale=1e-5, layer_scale_conv=1e-3)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(not m.bias.any() for m in linears if m.bias is not None)  # dt_proj's bias included
    mixers = [m for m in model.modules() if isinstance(m, MambaVisionMixer)]
    for mixer in mixers:
        assert mixer.dt_proj.bias is not None and not mixer.dt_proj.bias.any()
        n = mixer.A_log.shape[1]
        assert n == 8 and torch.equal(mixer.A_log, torch.log(torch.arange(1., n + 1)).expand_as(mixer.A_log))
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    hybrid = [b for b in _blocks(model) if isinstance(b, HybridBlock)]
    conv = [b for b in _blocks(model) if isinstance(b, ConvBlock)]
    assert all(torch.equal(b.ls1.gamma, torch.full_like(b.ls1.gamma, 1e-5)) for b in hybrid)
    assert all(torch.equal(b.ls2.gamma, torch.full_like(b.ls2.gamma, 1e-5)) for b in hybrid)
    assert all(torch.equal(b.ls.gamma, torch.full_like(b.ls.gamma, 1e-3)) for b in conv)
    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()


def test_stage_block_types():
    """Odd depths have one more mixer than attention blocks; attention comes last."""
    model = _model(depths=(1, 1, 3, 4))
    kinds = [[isinstance(b.mixer, MambaVisionMixer) for b in stage.blocks] for stage in model.stages[2:]]
    assert kinds == [[True, True, False], [True, True, False, False]]


# --- every full-size variant on random weights (CI: -m slow) ---

@pytest.mark.slow
@pytest.mark.parametrize('arch', ARCHS)
def test_full_size_forward_at_native_size(arch):
    model = timm.create_model(arch).eval()
    size = model.pretrained_cfg['input_size']
    with torch.no_grad():
        logits = model(torch.randn(1, *size))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
