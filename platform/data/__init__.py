"""Training and verification data: folder and RecordIO datasets, pair sets, samplers, augmentation."""

from faceforge.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset, identity_images
from faceforge.data.image import ImageDecodeError, center_crop_resize, decode_image, read_image, to_tensor
from faceforge.data.inspect import format_summary, inspect_dataset, open_dataset
from faceforge.data.record_dataset import RecordDataset, pack_folder, read_property
from faceforge.data.recordio import (
    IndexedRecordReader,
    IRHeader,
    RecordWriter,
    iter_records,
    pack_record,
    unpack_record,
)
from faceforge.data.samplers import DistributedBatchSampler, PKBatchSampler
from faceforge.data.transforms import EvalTransform, TrainTransform
from faceforge.data.verification import VerificationSet, load_bin, load_pairs, write_bin

__all__ = [
    "IMAGE_EXTENSIONS",
    "DistributedBatchSampler",
    "EvalTransform",
    "IRHeader",
    "ImageDecodeError",
    "ImageFolderDataset",
    "IndexedRecordReader",
    "PKBatchSampler",
    "RecordDataset",
    "RecordWriter",
    "TrainTransform",
    "VerificationSet",
    "center_crop_resize",
    "decode_image",
    "format_summary",
    "identity_images",
    "inspect_dataset",
    "iter_records",
    "load_bin",
    "load_pairs",
    "open_dataset",
    "pack_folder",
    "pack_record",
    "read_image",
    "read_property",
    "to_tensor",
    "unpack_record",
    "write_bin",
]
