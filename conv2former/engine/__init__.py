"""The training engine shared by every task: typed options, one training loop (``fit``), the training state and its
checkpoints, distributed set-up, run files and reports."""
from .loop import fit
from .options import RunOptions, add_arguments, option, resolve
from .runtime import TrainingDiverged
from .state import TrainState
from .task import Task

__all__ = ['RunOptions', 'Task', 'TrainState', 'TrainingDiverged', 'add_arguments', 'fit', 'option', 'resolve']
