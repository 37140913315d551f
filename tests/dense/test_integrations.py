"""MambaVision in torchvision's detectors (through mambavision_fpn_backbone) and in segmentation_models_pytorch."""
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import mambavision  # noqa: F401  (registers the models with timm, for smp's 'tu-' names)
from mambavision.dense.integrations import mambavision_fpn_backbone

H, W = 128, 160
DETECTOR_SIZES = dict(min_size=H, max_size=W)


def _images(n: int = 2):
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, H, W, generator=generator) for _ in range(n)]


def _targets():
    """Two images, one with two objects and one with one, boxes x1 y1 x2 y2 and filled box masks."""
    boxes = [torch.tensor([[10., 20., 70., 90.], [80., 30., 150., 120.]]), torch.tensor([[30., 40., 100., 110.]])]
    targets = []
    for image_boxes, labels in zip(boxes, [torch.tensor([1, 2]), torch.tensor([2])]):
        masks = torch.zeros(len(image_boxes), H, W, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, image_boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        targets.append(dict(boxes=image_boxes, labels=labels, masks=masks))
    return targets


def test_fpn_backbone_maps_names_strides_and_channels():
    backbone = mambavision_fpn_backbone('test_mambavision', out_channels=32)
    assert backbone.out_channels == 32
    assert backbone.body.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, H, W))
    assert list(maps) == ['0', '1', '2', '3', 'pool']
    assert [tuple(m.shape) for m in maps.values()] == [
        (1, 32, 32, 40), (1, 32, 16, 20), (1, 32, 8, 10), (1, 32, 4, 5), (1, 32, 2, 3)]


def test_mask_rcnn_trains_one_step_and_predicts():
    torch.manual_seed(0)
    backbone = mambavision_fpn_backbone('test_mambavision', out_channels=32)
    model = MaskRCNN(
        backbone, num_classes=3, **DETECTOR_SIZES, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
        rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32, box_batch_size_per_image=32,
        representation_size=64, box_score_thresh=0., box_detections_per_img=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    first_conv = backbone.body.model.stem.conv1.weight
    before = first_conv.detach().clone()

    model.train()
    losses = model(_images(), _targets())
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(first_conv, before)

    model.eval()
    with torch.no_grad():
        detections = model(_images())
    assert len(detections) == 2
    for found in detections:
        n = len(found['boxes'])
        assert 0 < n <= 10
        assert found['boxes'].shape == (n, 4) and found['scores'].shape == (n,) and found['labels'].shape == (n,)
        assert found['masks'].shape == (n, 1, H, W)
        assert ((found['labels'] >= 1) & (found['labels'] <= 2)).all()


@pytest.mark.parametrize('detector', [RetinaNet, FCOS])
def test_retinanet_and_fcos_predict(detector):
    torch.manual_seed(0)
    backbone = mambavision_fpn_backbone(
        'test_mambavision', out_channels=32, returned_layers=(1, 2, 3), extra_blocks=LastLevelP6P7(32, 32))
    with torch.no_grad():
        assert list(backbone(torch.randn(1, 3, H, W))) == ['0', '1', '2', 'p6', 'p7']
        model = detector(backbone, num_classes=3, **DETECTOR_SIZES, score_thresh=0., detections_per_img=10).eval()
        detections = model(_images(1))
    n = len(detections[0]['boxes'])
    assert 0 < n <= 10 and detections[0]['boxes'].shape == (n, 4) and detections[0]['scores'].shape == (n,)


def test_fpn_backbone_freezes_the_bottom_parts():
    backbone = mambavision_fpn_backbone('test_mambavision', trainable_stages=3)
    body = backbone.body.model
    expected = [(body.stem, False), (body.stages[0], False), (body.stages[1], True), (body.stages[3], True)]
    for part, trainable in expected:
        assert all(p.requires_grad == trainable for p in part.parameters())
    assert isinstance(body.stem.norm1, FrozenBatchNorm2d) and isinstance(body.stages[1].blocks[0].norm1, nn.BatchNorm2d)

    everything = mambavision_fpn_backbone('test_mambavision', trainable_stages=0, freeze_batch_norm=True)
    assert not any(p.requires_grad for p in everything.body.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in everything.modules())


def test_fpn_backbone_loads_weights_and_passes_model_options(tmp_path):
    source = timm.create_model('test_mambavision')
    path = tmp_path / 'weights.safetensors'
    save_file(source.state_dict(), str(path))
    backbone = mambavision_fpn_backbone('test_mambavision', checkpoint_path=str(path), window_size=(8, 8, 2, 1))
    name = 'stages.2.blocks.0.mlp.fc1.weight'
    assert torch.equal(backbone.body.model.get_parameter(name), source.get_parameter(name))
    assert [stage.window_size for stage in backbone.body.model.stages] == [None, None, 2, 1]


def test_fpn_backbone_takes_the_backbone_of_a_detection_checkpoint(tmp_path):
    """A published-style mmdet file: 'backbone.*' beside the detector's tensors, under 'state_dict' beside 'meta'."""
    source = timm.create_model('test_mambavision', num_classes=0, out_norm=True)
    state_dict = {'backbone.' + k: v for k, v in source.state_dict().items()}
    state_dict['neck.lateral_convs.0.conv.weight'] = torch.zeros(8, 16, 1, 1)
    path = tmp_path / 'detector.pth'
    torch.save(dict(meta=dict(epoch=36), state_dict=state_dict), path)
    backbone = mambavision_fpn_backbone('test_mambavision', checkpoint_path=str(path), out_norm=True)
    for name in ('out_norms.3.weight', 'stages.2.blocks.1.mixer.qkv.weight'):
        assert torch.equal(backbone.body.model.get_parameter(name), source.get_parameter(name))


def test_fpn_backbone_of_a_dense_weights_tag():
    backbone = mambavision_fpn_backbone('mambavision_t.nv_coco')
    assert [stage.window_size for stage in backbone.body.model.stages] == [None, None, 112, 56]
    assert backbone.body.model.out_norms is not None
    assert backbone.body.feature_info.channels() == [80, 160, 320, 640]


@pytest.mark.parametrize('bad, message', [
    (dict(trainable_stages=6), 'trainable_stages must be in 0..5, got 6'),
    (dict(returned_layers=(2, 1)), r'returned_layers must be increasing stage indices in 0..3, got \(2, 1\)'),
    (dict(returned_layers=(0, 4)), r'returned_layers must be increasing stage indices in 0..3, got \(0, 4\)'),
])
def test_fpn_backbone_bad_options_fail_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as error:
        mambavision_fpn_backbone('test_mambavision', **bad)
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('architecture', [
    smp.Unet, smp.UnetPlusPlus, smp.MAnet, smp.Linknet, smp.FPN, smp.PSPNet, smp.UPerNet, smp.Segformer, smp.DPT])
def test_smp_models_train_on_mambavision(architecture):
    torch.manual_seed(0)
    # DPT's default 'cat' readout is for encoders with a class token
    options = dict(decoder_readout='ignore') if architecture is smp.DPT else {}
    model = architecture('tu-test_mambavision', encoder_weights=None, classes=3, **options)
    first_conv = next(p for n, p in model.encoder.named_parameters() if n.endswith('stem.conv1.weight'))
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3, 64, 64)
    logits.square().mean().backward()
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_smp_full_size_encoder_and_local_weights(tmp_path):
    model = smp.UPerNet('tu-mambavision_t', encoder_weights=None, classes=3).eval()
    assert model.encoder.out_channels == [3, 0, 80, 160, 320, 640]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)

    source = timm.create_model('test_mambavision')
    path = tmp_path / 'weights.safetensors'
    save_file(source.state_dict(), str(path))
    model = smp.Unet('tu-test_mambavision', encoder_weights=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.encoder.model.model.stem.conv1.weight, source.stem.conv1.weight)


@pytest.mark.parametrize('architecture', [smp.DeepLabV3, smp.DeepLabV3Plus, smp.PAN])
def test_smp_dilated_models_fail_in_one_line(architecture):
    with pytest.raises(ValueError, match=r'MambaVision has no dilated stages: output_stride=(8|16) is not supported') \
            as error:
        architecture('tu-test_mambavision', encoder_weights=None)
    assert '\n' not in str(error.value)
