"""Training toolkit: configuration and recipes, the training loop, checkpoints, distributed set-up."""
from .config import add_train_args, parse_train_args
from .loop import train
from .runtime import TrainingDiverged
from .recipes import RECIPES

__all__ = ['RECIPES', 'TrainingDiverged', 'add_train_args', 'parse_train_args', 'train']
