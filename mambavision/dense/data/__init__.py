"""Training data of the dense models: datasets, the published training pipelines, batching."""
from .detection import (
    CROP_RANGE, CROP_SCALES, TEST_SCALE, TRAIN_SCALES, DetectionDataset, DetectionTestPipeline,
    DetectionTrainPipeline, ImageRecord, collate, crop, decode_masks, detection_dataset, hflip,
    read_coco_detection, read_yolo_detection, resize,
)

__all__ = [
    'TRAIN_SCALES', 'CROP_SCALES', 'CROP_RANGE', 'TEST_SCALE', 'ImageRecord', 'DetectionDataset',
    'DetectionTrainPipeline', 'DetectionTestPipeline', 'hflip', 'resize', 'crop', 'collate',
    'read_coco_detection', 'read_yolo_detection', 'detection_dataset', 'decode_masks',
]
