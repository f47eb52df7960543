"""Training CSC-CTRL models: image folders, rate-reduction losses, the closed-loop trainer, evaluation, figures."""

from .data import ImageFolderDataset, ImageReadError, list_images, load_image, split_paths
from .evaluate import EvalResult, evaluate_images, psnr
from .figures import atom_image, effective_atoms, save_atom_figures, save_training_figures
from .losses import binary_rate_reduction, class_rate_reduction, coding_rate, compression_rate, rate_reduction
from .run import train
from .trainer import TrainConfig, Trainer

__all__ = [
    "EvalResult",
    "ImageFolderDataset",
    "ImageReadError",
    "TrainConfig",
    "Trainer",
    "atom_image",
    "binary_rate_reduction",
    "class_rate_reduction",
    "coding_rate",
    "compression_rate",
    "effective_atoms",
    "evaluate_images",
    "list_images",
    "load_image",
    "psnr",
    "rate_reduction",
    "save_atom_figures",
    "save_training_figures",
    "split_paths",
    "train",
]
