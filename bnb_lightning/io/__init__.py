"""Persistence: checkpoints loaded while quantizing, state dict files, adapter-only checkpoints, adapter and
merged exports, atomic files.

Everything here writes atomically (a failed write leaves the previous file or directory as it was)
and checks before it loads (a refused load leaves the model as it was).
"""

from .export import export_adapters, load_adapters
from .loading import quantize_from_checkpoint
from .merge import MergedExport, MergeToleranceError, export_merged, merged_model
from .shards import CheckpointError
from .state_dict import load_state_dict_file, read_state_dict_file, save_state_dict_file

__all__ = [
    "quantize_from_checkpoint",
    "CheckpointError",
    "save_state_dict_file",
    "load_state_dict_file",
    "read_state_dict_file",
    "export_adapters",
    "load_adapters",
    "export_merged",
    "merged_model",
    "MergedExport",
    "MergeToleranceError",
]
