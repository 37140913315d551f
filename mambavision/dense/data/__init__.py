"""Training data of the dense models: datasets, the published training pipelines, batching."""
from .detection import (
    CROP_RANGE, CROP_SCALES, TEST_SCALE, TRAIN_SCALES, DetectionDataset, DetectionTestPipeline,
    DetectionTrainPipeline, ImageRecord, collate, crop, decode_masks, detection_dataset, hflip,
    read_coco_detection, read_yolo_detection, resize,
)
from .segmentation import (
    SegmentationDataset, SegmentationSplit, SegmentationTrainPipeline, collate_segmentation, read_ade20k,
    read_segmentation_folder, segmentation_split,
)

__all__ = [
    'TRAIN_SCALES', 'CROP_SCALES', 'CROP_RANGE', 'TEST_SCALE', 'ImageRecord', 'DetectionDataset',
    'DetectionTrainPipeline', 'DetectionTestPipeline', 'hflip', 'resize', 'crop', 'collate',
    'read_coco_detection', 'read_yolo_detection', 'detection_dataset', 'decode_masks',
    'SegmentationSplit', 'SegmentationDataset', 'SegmentationTrainPipeline', 'collate_segmentation',
    'segmentation_split', 'read_segmentation_folder', 'read_ade20k',
]
