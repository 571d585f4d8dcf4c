"""xtrainer: the Hugging Face Trainer API, JAX/XLA-first, with PyTorch backends.

Change `from transformers import Trainer, TrainingArguments` to `from xtrainer import ...`.
"""

from .callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from .checkpoint import CheckpointDiskFullError
from .data import default_data_collator
from .hyperparameter_search import BestRun, HPSearchBackend
from .manifest import CheckpointIntegrityError
from .model_wrappers import FunctionalModel, LinenModel
from .preemption import TrainingPreempted
from .trainer import Trainer
from .seq2seq import Seq2SeqTrainer
from .trainer_utils import (
    EvalPrediction,
    IntervalStrategy,
    PredictionOutput,
    SaveStrategy,
    SchedulerType,
    TrainOutput,
    get_last_checkpoint,
    set_seed,
)
from .training_args import Seq2SeqTrainingArguments, TrainingArguments

__version__ = "0.1.0"

__all__ = [
    "BestRun",
    "CallbackHandler",
    "CheckpointDiskFullError",
    "CheckpointIntegrityError",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "FunctionalModel",
    "HPSearchBackend",
    "LinenModel",
    "IntervalStrategy",
    "PredictionOutput",
    "PrinterCallback",
    "ProgressCallback",
    "SaveStrategy",
    "SchedulerType",
    "Seq2SeqTrainer",
    "Seq2SeqTrainingArguments",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "TrainingPreempted",
    "default_data_collator",
    "get_last_checkpoint",
    "set_seed",
]
