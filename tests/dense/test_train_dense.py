"""The dense training engine: mmengine's lr schedules to the bit, the 'norm' weight-decay rule, the data stream,
a tiny UPerNet that learns a synthetic dataset, 2 processes (gloo, SyncBN) equal to 1, resume equal to no
interruption, checkpoints that the weights reader loads."""
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mambavision.dense import train as dense_train
from mambavision.dense.segmentation import UPerNet
from mambavision.dense.train import (
    DenseTrainConfig, StreamSampler, SyncBatchNorm2d, optimizer_param_groups, poly_schedule, recipe,
    scaled_milestones, step_schedule, train_dense, train_sampler,
)
from mambavision.model import create_dense_backbone
from mambavision.weights import load_state_dict_strict, read_checkpoint, read_state_dict

from conftest import DENSE_FIXTURES

CLASSES = ('background', 'square', 'disc', 'triangle')
PALETTE = ((0, 0, 0), (230, 60, 60), (60, 200, 60), (60, 60, 230))
MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])


# ---------------------------------------------------------------------------------------------------------------------
# a small synthetic dataset: shapes on textured backgrounds


def _shapes_sample(index: int, size: int = 64):
    """(H, W, 3) uint8 image and (H, W) uint8 label: one to three shapes on a noisy striped background."""
    rng = np.random.default_rng([7, index])
    yy, xx = np.mgrid[:size, :size]
    stripes = 60 + 40 * np.sin(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(-0.4, 0.4))
    image = np.clip(stripes[..., None] + rng.normal(0, 12, (size, size, 3)), 0, 255)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, 4))
        r = rng.integers(8, 14)
        cy, cx = rng.integers(r, size - r, 2)
        if cls == 1:
            inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        elif cls == 2:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            inside = (yy - cy >= -r) & (yy - cy <= r) & (abs(xx - cx) <= (yy - cy + r) / 2)
        colour = np.array(PALETTE[cls]) * rng.uniform(0.7, 1.0) + rng.normal(0, 10, (size, size, 3))
        image[inside] = np.clip(colour[inside], 0, 255)
        label[inside] = cls
    return image.astype(np.uint8), label


class ShapesDataset(torch.utils.data.Dataset):
    """The dense data interface (``load``, ``set_epoch``, per-sample generators from (seed, epoch, index)):
    items ``(image (3, h, w) float32 normalised, label (h, w) int64)``, augmented by a random flip and crop
    when ``train``."""

    def __init__(self, indices, train: bool, seed: int = 0):
        self.indices, self.train, self.seed, self.epoch = list(indices), train, seed, 0
        self.class_names = CLASSES

    def __len__(self):
        return len(self.indices)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def load(self, index: int):
        return _shapes_sample(self.indices[index])

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < 0.5:
                image, label = image[:, ::-1], label[:, ::-1]
            top, left = rng.integers(0, 9, 2)
            image, label = image[top:top + 56, left:left + 56], label[top:top + 56, left:left + 56]
        x = torch.from_numpy(((image - MEAN) / STD).astype(np.float32)).permute(2, 0, 1).contiguous()
        return x, torch.from_numpy(label.astype(np.int64))


def collate(batch):
    images, labels = zip(*batch)
    return torch.stack(images), torch.stack(labels)


def tiny_upernet(dropout: float = 0.1, drop_path: float = 0., width: int = 16) -> UPerNet:
    torch.manual_seed(0)
    backbone = create_dense_backbone('test_mambavision', (8, 8, 8, 4), dim=width, in_dim=8, depths=(1, 1, 1, 1),
                                     num_heads=(1, 1, 2, 2), drop_path_rate=drop_path)
    return UPerNet(backbone, num_classes=len(CLASSES), channels=width, aux_channels=8, dropout=dropout,
                   test_scale=(64, 64), class_names=CLASSES, palette=PALETTE)


def _config(tmp_path, name: str, **kwargs) -> DenseTrainConfig:
    settings = dict(task='seg', output=str(tmp_path / name), model_name='tiny_upernet', iters=6, lr=2e-3,
                    weight_decay=0.01, warmup_iters=2, total_batch=4, batch_size=4, amp='none', eval_interval=0,
                    log_interval=2, workers=0, seed=3)
    return DenseTrainConfig(**dict(settings, **kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# schedules, optimiser groups, recipe, data stream


@pytest.fixture(scope='module')
def mmengine_lrs():
    return json.loads((DENSE_FIXTURES / 'lr_schedules.json').read_text())


def test_poly_schedule_is_mmengines_to_the_bit(mmengine_lrs):
    for case in mmengine_lrs['seg']:
        lrs = poly_schedule(case['base_lr'], case['iters'], case['warmup_iters'])
        assert len(lrs) == case['iters']
        assert {int(i): lrs[int(i)] for i in case['lrs']} == {int(i): v for i, v in case['lrs'].items()}
        assert lrs[-1] == 0 and lrs[0] == case['base_lr'] * 1e-6


def test_step_schedule_is_mmengines_to_the_bit(mmengine_lrs):
    for case in mmengine_lrs['det']:
        lrs = step_schedule(case['base_lr'], case['epochs'], case['iters_per_epoch'], case['milestones'],
                            case['warmup_iters'])
        assert {int(i): lrs[int(i)] for i in case['lrs']} == {int(i): v for i, v in case['lrs'].items()}
    assert scaled_milestones(36) == [27, 33] and scaled_milestones(12) == [9, 11]


def test_recipe_per_variant():
    assert recipe('seg', 'upernet_mambavision_t')['lr'] == 5e-5
    assert recipe('seg', 'upernet_mambavision_s.nv_ade20k')['lr'] == 6e-5
    assert recipe('seg', 'upernet_mambavision_b')['lr'] == 5e-5
    l3 = recipe('seg', 'upernet_mambavision_l3.nv_in21k_ade20k_640')
    assert (l3['lr'], l3['weight_decay'], l3['iters'], l3['warmup_iters']) == (8e-5, 0.05, 160_000, 1500)
    assert recipe('seg', 'upernet_mambavision_t')['weight_decay'] == 0.01
    det_b = recipe('det', 'cascade_mask_rcnn_mambavision_b')
    assert (det_b['lr'], det_b['weight_decay'], det_b['epochs'], det_b['warmup_iters']) == (2e-4, 0.05, 36, 1000)
    assert recipe('det', 'cascade_mask_rcnn_mambavision_t.nv_coco')['lr'] == 1e-4
    with pytest.raises(ValueError, match="'seg' or 'det'"):
        recipe('cls')


def test_no_decay_exactly_where_the_published_name_contains_norm():
    """mmengine matches 'norm' in the published parameter name: LayerNorms and out-norms get no decay, the
    stem's BatchNorms (published ``patch_embed.conv_down.1/.4``) and the heads' ``bn`` do."""
    model = tiny_upernet()
    decay, no_decay = optimizer_param_groups(model, 0.05)
    assert (decay['weight_decay'], no_decay['weight_decay']) == (0.05, 0.)
    names = {id(p): n for n, p in model.named_parameters()}
    free = {names[id(p)] for p in no_decay['params']}
    assert 'backbone.stem.norm1.weight' not in free and 'decode_head.bottleneck.bn.weight' not in free
    assert 'backbone.out_norms.0.weight' in free
    assert any(n.startswith('backbone.stages.') and '.norm1.' in n for n in free)
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_stream_shards_each_step_the_same_for_any_world_size():
    one = StreamSampler(10, total_batch=8, batch_size=4, world=1, rank=0, seed=1, start=0, iters=3)
    two = [StreamSampler(10, total_batch=8, batch_size=2, world=2, rank=r, seed=1, start=0, iters=3) for r in (0, 1)]
    batches = list(one)
    shares = [list(s) for s in two]
    assert len(batches) == 6 and len(shares[0]) == 6  # 2 micro-batches per step
    for micro, batch in enumerate(batches):  # rank r's share of each micro-batch: its r-th slice
        assert batch == shares[0][micro] + shares[1][micro]
    keys = [k for b in batches for k in b]
    assert sorted(i for e, i in keys if e == 0) == list(range(10))  # epoch 0 is a permutation, then epoch 1
    assert [k[0] for k in keys] == [0] * 10 + [1] * 10 + [2] * 4
    resumed = StreamSampler(10, total_batch=8, batch_size=4, world=1, rank=0, seed=1, start=2, iters=3)
    assert list(resumed) == batches[4:]


def _mixed(batch, groups) -> bool:
    return len({int(groups[i]) for _, i in batch}) > 1


def test_stream_groups_keep_each_step_and_mix_at_most_one_batch_per_step():
    """Aspect-ratio groups reorder each step's images only: same images per step, one-group micro-batches but
    for at most one per step, any world size giving the same shares, resume equal to no interruption."""
    groups = (np.arange(50) * 7 % 10 < 3).astype(int)  # 30% portrait, spread through the indices
    steps, per_step = 7, 8  # 16 images per step, 2 per micro-batch
    plain = list(StreamSampler(50, total_batch=16, batch_size=2, world=1, rank=0, seed=3, start=0, iters=steps))
    grouped = list(StreamSampler(50, 16, 2, 1, 0, 3, 0, steps, groups=groups))

    def images_per_step(batches):
        return [sorted(k for b in batches[s * per_step:(s + 1) * per_step] for k in b) for s in range(steps)]

    assert images_per_step(grouped) == images_per_step(plain)
    mixed = [_mixed(b, groups) for b in grouped]
    assert all(sum(mixed[s * per_step:(s + 1) * per_step]) <= 1 for s in range(steps))
    assert sum(mixed) < sum(_mixed(b, groups) for b in plain) / 2  # ungrouped, about 2 x 0.3 x 0.7 of the pairs
    ranks = [list(StreamSampler(50, 16, 1, 2, r, 3, 0, steps, groups=groups)) for r in (0, 1)]
    assert grouped == [a + b for a, b in zip(*ranks)]
    assert list(StreamSampler(50, 16, 2, 1, 0, 3, 3, steps, groups=groups)) == grouped[3 * per_step:]
    with pytest.raises(ValueError, match='groups has 49 entries for 50 samples'):
        StreamSampler(50, 16, 2, 1, 0, 3, 0, steps, groups=groups[:49])


def test_training_batches_of_a_detection_set_are_grouped_by_aspect_ratio():
    from mambavision.dense.data import DetectionDataset
    from mambavision.dense.data.detection import ImageRecord
    sizes = [(60, 40), (40, 60), (50, 50), (30, 90), (90, 30), (40, 41), (41, 40), (70, 20)] * 4  # (height, width)
    records = [ImageRecord(i, f'{i}.png', h, w, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
               for i, (h, w) in enumerate(sizes)]
    dataset = DetectionDataset(records, ('thing',), (1,), with_masks=False)
    groups = dataset.aspect_groups()
    assert groups.tolist()[:8] == [0, 1, 1, 1, 0, 1, 0, 0]  # 0: narrower than tall, as mmdet buckets them
    config = DenseTrainConfig(task='det', output='unused', total_batch=8, batch_size=2).resolved()
    batches = list(train_sampler(dataset, config, world=1, rank=0, start=0, iters=8))
    assert len(batches) == 32 and sum(_mixed(b, groups) for b in batches) <= 8
    segmentation_like = torch.utils.data.TensorDataset(torch.zeros(32))  # no aspect_groups: the plain stream
    assert train_sampler(segmentation_like, config, 1, 0, 0, 8).groups is None
    with pytest.raises(ValueError, match='needs a resolved config'):
        train_sampler(dataset, DenseTrainConfig(task='det', output='unused'), 1, 0, 0, 8)


def test_batch_split_must_make_the_total():
    with pytest.raises(ValueError, match='16 images per step cannot be made of 3 per process x 2'):
        dense_train._batch_split(16, 3, 2)
    assert dense_train._batch_split(16, 2, 1) == 8


# ---------------------------------------------------------------------------------------------------------------------
# training runs


def test_tiny_upernet_learns_synthetic_shapes(tmp_path):
    """160 iterations of 8 images from scratch: mIoU far above what predicting the background gives (21 %)."""
    model = tiny_upernet(dropout=0., width=32)
    config = _config(tmp_path, 'learn', iters=160, lr=2e-3, warmup_iters=10, total_batch=8, batch_size=8,
                     eval_interval=80, log_interval=40)
    summary = train_dense(model, config, ShapesDataset(range(64), train=True), collate,
                          ShapesDataset(range(1000, 1016), train=False))
    assert summary['best']['mIoU'] > 70, summary
    rows = [json.loads(line) for line in open(tmp_path / 'learn' / 'metrics.jsonl')]
    train_rows = [r for r in rows if r['kind'] == 'train']
    assert train_rows[-1]['loss'] < 0.5 * train_rows[0]['loss']
    val_rows = [r for r in rows if r['kind'] == 'val']
    assert [r['iter'] for r in val_rows] == [80, 160]
    assert max(r['mIoU'] for r in val_rows) == summary['best']['mIoU']
    saved = json.loads((tmp_path / 'learn' / 'config.json').read_text())
    assert saved['lr'] == 2e-3 and saved['accumulation'] == 1 and saved['world_size'] == 1

    # the best checkpoint: weights_only-readable, loads strictly, carries class names and palette
    best = read_checkpoint(str(tmp_path / 'learn' / 'best.pth'))
    assert best['meta']['dataset_meta'] == dict(classes=list(CLASSES), palette=[list(c) for c in PALETTE])
    assert best['meta']['iteration'] == summary['best']['iteration']
    assert best['meta']['metrics']['mIoU'] == summary['best']['mIoU']
    fresh = tiny_upernet(width=32)
    load_state_dict_strict(fresh, read_state_dict(str(tmp_path / 'learn' / 'best.pth')), 'best.pth')
    image, label = _shapes_sample(1000)
    pred = fresh.eval().predict(image)[0]['labels']
    assert (pred.numpy() == label).mean() > 0.9


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Stopped after 3 of 6 iterations (dropout, drop path, 2 accumulation steps) and resumed with another worker
    count: weights, optimiser state and BatchNorm statistics equal the uninterrupted run's, bit for bit."""
    saves = []
    save = dense_train.save_checkpoint

    def keep_copies(state, path):
        save(state, path)
        if 'optimizer' in state:
            saves.append((state['iteration'], path + f'.{state["iteration"]}'))
            save(state, saves[-1][1])

    monkeypatch.setattr(dense_train, 'save_checkpoint', keep_copies)
    config = _config(tmp_path, 'whole', batch_size=2, checkpoint_interval=3)
    dataset = ShapesDataset(range(10), train=True)
    train_dense(tiny_upernet(dropout=0.3, drop_path=0.2), config, dataset, collate)
    assert [i for i, _ in saves] == [3, 6]
    halfway = saves[0][1]
    resumed = _config(tmp_path, 'resumed', batch_size=2, checkpoint_interval=3, resume=halfway, workers=1)
    train_dense(tiny_upernet(dropout=0.3, drop_path=0.2), resumed, dataset, collate)
    whole, again = (read_checkpoint(str(tmp_path / name / 'last.pth')) for name in ('whole', 'resumed'))
    assert again['iteration'] == whole['iteration'] == 6
    for name, tensor in whole['state_dict'].items():
        assert torch.equal(tensor, again['state_dict'][name]), name
    for a, b in zip(whole['optimizer']['state'].values(), again['optimizer']['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a run with another seed differs (the comparison above can fail)
    other = _config(tmp_path, 'other', batch_size=2, seed=4)
    train_dense(tiny_upernet(dropout=0.3, drop_path=0.2), other, dataset, collate)
    other_state = read_checkpoint(str(tmp_path / 'other' / 'last.pth'))['state_dict']
    name = 'decode_head.conv_seg.weight'
    assert not torch.equal(other_state[name], whole['state_dict'][name])


def _two_process_worker(rank: int, store: str, output: str, result: str):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        _check_sync_batchnorm(rank)
        config = DenseTrainConfig(**dict(json.loads(open(output + '.json').read()), output=output))
        model = tiny_upernet(dropout=0.)
        train_dense(model, config, ShapesDataset(range(12), train=True), collate)
        if rank == 1:  # rank 1's replica (rank 0 writes last.pth): DDP keeps them equal
            torch.save(model.state_dict(), result)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    """2 gloo processes x 2 images (SyncBatchNorm, CPU) make the same weights after 4 steps as 1 process x 4
    (and SyncBatchNorm2d alone equals BatchNorm2d of the whole batch, checked in the workers)."""
    settings = dict(task='seg', model_name='tiny_upernet', iters=4, lr=2e-3, weight_decay=0.01, warmup_iters=2,
                    total_batch=8, amp='none', eval_interval=0, log_interval=2, workers=0, seed=3, sync_bn='all')
    one = DenseTrainConfig(**dict(settings, output=str(tmp_path / 'one'), batch_size=4))
    train_dense(tiny_upernet(dropout=0.), one, ShapesDataset(range(12), train=True), collate)
    output = str(tmp_path / 'two')
    with open(output + '.json', 'w') as f:
        json.dump(dict(settings, batch_size=2), f)
    mp.start_processes(_two_process_worker, args=(str(tmp_path / 'store'), output, str(tmp_path / 'rank1.pt')),
                       nprocs=2, start_method='spawn')
    single = read_checkpoint(str(tmp_path / 'one' / 'last.pth'))['state_dict']
    double = read_checkpoint(output + '/last.pth')['state_dict']
    rank1 = torch.load(tmp_path / 'rank1.pt', weights_only=True)
    assert single.keys() == double.keys()
    # Adam moves a parameter by about the lr per step whatever its gradient's size, unless the gradient is below
    # its eps (1e-8): then rounding noise counts, and for those whose gradient is zero in exact arithmetic (biases
    # right before a BatchNorm, which removes any constant) it is all there is. Parameters the single run moved by
    # less than lr / 4 only have to stay small; all others must agree.
    start, lr = tiny_upernet().state_dict(), settings['lr']
    bad, noise_driven = [], []
    for name, tensor in single.items():
        assert torch.equal(double[name], rank1[name]), name
        if not tensor.is_floating_point():
            continue
        moved = (tensor - start[name]).abs().max().item()
        diff = (double[name] - tensor).abs().max().item()
        if moved < lr / 4 and 'running_' not in name:
            noise_driven.append(name)
            assert (double[name] - start[name]).abs().max() < lr / 4, name
        elif diff > 1e-5 + 1e-3 * moved:
            bad.append((name, diff, moved))
    assert not bad, bad
    assert len(noise_driven) < 0.1 * len(single), noise_driven
    assert double['decode_head.bottleneck.bn.num_batches_tracked'] == 4 * 2  # 2 micro-batches per step


def _check_sync_batchnorm(rank: int):
    """Outputs, input gradients and running statistics of SyncBatchNorm2d on 2 gloo processes equal BatchNorm2d's on
    both halves of the batch together."""
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 6) * 3 + 1).requires_grad_()
    weights = torch.randn(4, 3, 5, 6)
    reference = torch.nn.BatchNorm2d(3)
    sync = SyncBatchNorm2d(3)
    expected = reference(x)
    (expected * weights).sum().backward()
    half = x.detach()[2 * rank:2 * rank + 2].clone().requires_grad_()
    out = sync(half)
    (out * weights[2 * rank:2 * rank + 2]).sum().backward()
    torch.testing.assert_close(out, expected[2 * rank:2 * rank + 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(half.grad, x.grad[2 * rank:2 * rank + 2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sync.running_mean, reference.running_mean)
    torch.testing.assert_close(sync.running_var, reference.running_var)


def test_checkpoint_of_the_engine_is_weights_only_safe(tmp_path):
    config = _config(tmp_path, 'safe', iters=3, batch_size=2)
    train_dense(tiny_upernet(), config, ShapesDataset(range(6), train=True), collate)
    path = tmp_path / 'safe' / 'last.pth'
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint['iteration'] == 3 and checkpoint['config']['lr'] == 2e-3
    assert set(read_state_dict(str(path))) == set(tiny_upernet().state_dict())
    assert not os.path.exists(str(path) + '.tmp')
    with pytest.raises(ValueError, match='not a training checkpoint'):
        torch.save(dict(state_dict=checkpoint['state_dict']), tmp_path / 'weights.pth')
        train_dense(tiny_upernet(), _config(tmp_path, 'again', resume=str(tmp_path / 'weights.pth')),
                    ShapesDataset(range(6), train=True), collate)


# ---------------------------------------------------------------------------------------------------------------------
# detection


def _write_shapes_coco(folder, split: str, count: int, first: int, with_masks: bool = True, size: int = 96):
    """``folder/split/*.png`` and ``folder/split.json``: one or two squares (category 3) or triangles (category 7)
    per image on a striped background, polygons as masks (or boxes only)."""
    from PIL import Image, ImageDraw
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(first, first + count):
        rng = np.random.default_rng([11, image_id])
        yy, xx = np.mgrid[:size, :size]
        stripes = 70 + 30 * np.sin(xx * rng.uniform(0.2, 0.5) + yy * 0.3)
        background = stripes[..., None] + rng.normal(0, 8, (size, size, 3))
        picture = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for slot in range(int(rng.integers(1, 3))):
            category = int(rng.choice([3, 7]))
            side = int(rng.integers(22, 34))
            x = int(rng.integers(2, size // 2 - side // 2)) + slot * size // 2
            y = int(rng.integers(2, size - side - 2))
            polygon = ([x, y, x + side, y, x + side, y + side, x, y + side] if category == 3 else
                       [x + side / 2, y, x + side, y + side, x, y + side])
            draw.polygon(polygon, fill=(230, 70, 60) if category == 3 else (60, 90, 230))
            annotation = dict(id=len(annotations) + 1, image_id=image_id, category_id=category, iscrowd=0,
                              bbox=[x, y, side, side], area=side * side)
            if with_masks:
                annotation['segmentation'] = [polygon]
            annotations.append(annotation)
        picture.save(folder / split / f'{image_id}.png')
        images.append(dict(id=image_id, file_name=f'{image_id}.png', height=size, width=size))
    (folder / f'{split}.json').write_text(json.dumps(dict(
        images=images, annotations=annotations,
        categories=[dict(id=3, name='square'), dict(id=7, name='triangle')])))


def _flip(image, target, rng):
    if rng.random() < 0.5:
        from mambavision.dense.data.detection import hflip
        image, target = hflip(image, target)
    return image, target


def tiny_detector(num_classes: int = 2):
    from mambavision.dense.detection import CascadeMaskRCNN
    torch.manual_seed(0)
    backbone = create_dense_backbone('test_mambavision', (8, 8, 8, 4), dim=16, in_dim=8, depths=(1, 1, 1, 1),
                                     num_heads=(1, 1, 2, 2))
    # fewer proposals and RoIs than published (2000 / 512), for speed on a CPU
    train_cfg = {'rpn_proposal.nms_pre': 300, 'rpn_proposal.max_per_img': 300,
                 **{f'rcnn.{i}.sampler.num': 64 for i in range(3)}}
    return CascadeMaskRCNN(backbone, num_classes=num_classes, channels=32, fc_channels=64, test_scale=(96, 96),
                           class_names=('square', 'triangle'), train_cfg=train_cfg)


def _train_tiny_detector(tmp_path, with_masks: bool, epochs: int):
    from mambavision.dense.data import collate_detection, detection_dataset
    pytest.importorskip('pycocotools')
    _write_shapes_coco(tmp_path, 'train', 32, 0, with_masks)
    _write_shapes_coco(tmp_path, 'val', 8, 1000, with_masks)
    train_set = detection_dataset(str(tmp_path), 'train', pipeline=_flip, seed=3)
    val_set = detection_dataset(str(tmp_path), 'val', pipeline=None)
    config = DenseTrainConfig(task='det', output=str(tmp_path / 'run'), model_name='tiny_cascade', epochs=epochs,
                              lr=1e-3, warmup_iters=10, total_batch=8, batch_size=8, amp='none', eval_interval=epochs,
                              log_interval=4, workers=0, seed=3)
    model = tiny_detector()
    summary = train_dense(model, config, train_set, collate_detection, val_set)
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    return model, summary, [r for r in rows if r['kind'] == 'train']


def test_tiny_detector_learns_synthetic_shapes(tmp_path):
    """64 iterations of 8 images from scratch: box and mask AP50 clearly above chance (random boxes: ~0)."""
    _, summary, train_rows = _train_tiny_detector(tmp_path, with_masks=True, epochs=16)
    assert 'loss_rpn_cls.0' in train_rows[0] and 's2.loss_bbox' in train_rows[0] and 's0.loss_mask' in train_rows[0]
    total = [sum(v for k, v in r.items() if 'loss' in k) for r in train_rows]
    assert total[-1] < 0.6 * total[0]
    assert summary['best']['bbox_AP50'] > 8 and summary['best']['segm_AP50'] > 4, summary['best']
    best = read_checkpoint(str(tmp_path / 'run' / 'best.pth'))
    assert best['meta']['dataset_meta']['classes'] == ['square', 'triangle']


def test_tiny_detector_trains_on_boxes_only(tmp_path):
    """Boxes-only data: no mask losses, the mask heads untouched, box AP alone evaluated."""
    model, summary, train_rows = _train_tiny_detector(tmp_path, with_masks=False, epochs=2)
    assert 's0.loss_bbox' in train_rows[0] and not any('mask' in k for k in train_rows[0])
    assert 'bbox_AP' in summary['best'] and 'segm_AP' not in summary['best']
    untouched = tiny_detector().state_dict()
    for name, tensor in model.state_dict().items():
        if 'mask_head' in name:
            assert torch.equal(tensor, untouched[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# the command line


def test_train_task_seg_command_line(tmp_path, capsys):
    """``mambavision train --task seg`` on one's own folder: a UPerNet-T from random weights, 1 iteration of a 64 px
    crop (no validation: UPerNet-T at the published 512 px test scale takes long here); the checkpoint loads into
    ``create_segmenter`` with the folder's classes."""
    from PIL import Image

    from mambavision.cli import main
    from mambavision.dense.segmentation import create_segmenter

    data = tmp_path / 'data'
    for split, indices in (('train', (0, 1)), ('val', (2,))):
        (data / split / 'images').mkdir(parents=True)
        (data / split / 'masks').mkdir(parents=True)
        for i in indices:
            image, label = _shapes_sample(i)
            Image.fromarray(image).save(data / split / 'images' / f'{i}.png')
            Image.fromarray(label).save(data / split / 'masks' / f'{i}.png')
    (data / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')
    output = tmp_path / 'run'
    assert main(['train', '--task', 'seg', '--data-dir', str(data), '--model', 'upernet_mambavision_t',
                 '--iters', '1', '--warmup-iters', '0', '--crop-size', '64', '--total-batch', '4', '--batch-size', '2',
                 '--workers', '0', '--device', 'cpu', '--eval-interval', '0', '--output', str(output)]) == 0
    settings = json.loads((output / 'config.json').read_text())
    assert (settings['lr'], settings['weight_decay'], settings['accumulation']) == (5e-5, 0.01, 2)
    model = create_segmenter('upernet_mambavision_t', checkpoint_path=str(output / 'last.pth'),
                             num_classes=len(CLASSES))
    assert model.decode_head.conv_seg.out_channels == len(CLASSES)
    meta = read_checkpoint(str(output / 'last.pth'))['meta']
    assert meta['dataset_meta']['classes'] == list(CLASSES) and meta['model'] == 'upernet_mambavision_t'
    assert main(['train', '--task', 'seg', '--data-dir', str(data), '--epochs', '3', '--output', str(output)]) == 1
    assert main(['train', '--task', 'seg', '--data-dir', str(data), '--iters', '2', '--output', str(output)]) == 1
    errors = capsys.readouterr().err
    assert '--epochs applies to --task det' in errors and 'already holds a run' in errors
