"""Training data of the dense models: datasets, the published training pipelines, batching."""
from .detection import (
    DetectionDataset, DetectionTestPipeline, DetectionTrainPipeline, collate_detection, detection_dataset,
    read_coco_detection, read_yolo_detection,
)
from .segmentation import (
    SegmentationDataset, SegmentationSplit, SegmentationTrainPipeline, collate_segmentation, read_ade20k,
    read_segmentation_folder, segmentation_split,
)

__all__ = [
    'DetectionDataset', 'DetectionTrainPipeline', 'DetectionTestPipeline', 'collate_detection',
    'detection_dataset', 'read_coco_detection', 'read_yolo_detection',
    'SegmentationSplit', 'SegmentationDataset', 'SegmentationTrainPipeline', 'collate_segmentation',
    'segmentation_split', 'read_segmentation_folder', 'read_ade20k',
]
