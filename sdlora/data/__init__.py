"""Training data: load the dataset, turn images into training pictures without torchvision, plan every batch.

Augmentation randomness (flips, random crops), caption choices and the batch order are pure functions
of (seed, epoch, example index), not of a random state that runs forward; so a resumed run sees exactly
the batches, pictures and captions an uninterrupted run would, in any number of worker processes.
"""

from .checks import check_captions, check_images
from .pictures import RESAMPLE, Augment, TrainImages, augmentation, collate, image_source, picture, to_tensor
from .plan import BatchPlan, Schedule, Step, resolve_schedule
from .sources import DatasetSource, load_image_folder, load_train_dataset

__all__ = [
    "RESAMPLE",
    "Augment",
    "BatchPlan",
    "DatasetSource",
    "Schedule",
    "Step",
    "TrainImages",
    "augmentation",
    "check_captions",
    "check_images",
    "collate",
    "image_source",
    "load_image_folder",
    "load_train_dataset",
    "picture",
    "resolve_schedule",
    "to_tensor",
]
