"""What a task plugs into the engine: a class with these attributes and methods (classification, detection and
segmentation implement it in ``conv2former.tasks``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .distributed import DistEnv


class Task(Protocol):
    options: Any              # the task's options dataclass (see engine.options)
    model_id: str             # names the model in checkpoints: resuming another model's run is refused
    run_name: str             # default run folder prefix
    best_metric: str          # key of the metric that selects best/ (higher is better)
    best_key: str             # key of best_metric's best value in the final metrics: 'best_' + the name under
    #                           which results.json holds the final value ('best_top1', 'best_mIoU')
    ema_metric: str           # column for the EMA model's best_metric
    title: str                # report title
    columns: Sequence[tuple[str, str, str]]  # report columns: (header, metrics key, format)
    curves: dict              # report curves: {label: metrics key}
    metric_label: str         # y-axis label of the metric curves
    collate: Optional[Callable]
    name: str                 # the CLI command prefix of the task's train command ('' for classification)
    find_unused_parameters: bool  # DDP must allow parameters without gradients (detectors' heads)
    ema_decay: Optional[float]    # keep an EMA of the weights with this decay (None: no EMA)
    compile_backend: Optional[str]  # torch.compile the training model with this backend (None: eager)

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, val); both have ``class_names``; data clean-up counts are logged by ``log_data``."""

    def merge_data_counts(self, env: DistEnv) -> None:
        """Make per-process counts of the datasets (skipped files) the run's; a collective, called on every rank
        before ``finish``."""

    def log_data(self, train: Dataset, val: Dataset) -> None:
        """Log what the data loading skipped or repaired."""

    def build_model(self, class_names: Sequence[str], resuming: bool) -> nn.Module:
        """The model on CPU; pretrained weights are loaded only when not ``resuming``."""

    def optimizer(self, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
        """The optimizer (parameter groups, lr, weight decay, layer decay)."""

    def schedule(self, steps_per_epoch: int) -> dict:
        """Keyword arguments of ``timm.scheduler.create_scheduler_v2`` besides the optimizer and the step counts."""

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """The loss of one micro-batch (augmentations such as mixup belong here)."""

    def evaluate(self, model: nn.Module, dataset: Dataset, env: DistEnv, amp_dtype=None, progress: bool = False
                 ) -> Optional[dict]:
        """Metrics of ``model`` on ``dataset`` (flat numbers first; nested dicts allowed); None on ranks > 0."""

    def write_model(self, model: nn.Module, folder: Path, ema_state_dict: Optional[dict] = None) -> Path:
        """Write a model folder that the task's evaluation and prediction commands load."""

    def finish(self, model: nn.Module, val: Dataset, run_dir: Path, final: dict, last_eval: Optional[dict]
               ) -> dict:
        """Write the task's result files (results.json, confusion matrix or overlays); returns the report's
        images {caption: path relative to run_dir}."""
