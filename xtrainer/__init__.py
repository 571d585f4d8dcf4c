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
from .data import default_data_collator
from .model_wrappers import FunctionalModel, LinenModel
from .trainer import Trainer
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
    "CallbackHandler",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "FunctionalModel",
    "LinenModel",
    "IntervalStrategy",
    "PredictionOutput",
    "PrinterCallback",
    "ProgressCallback",
    "SaveStrategy",
    "SchedulerType",
    "Seq2SeqTrainingArguments",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "default_data_collator",
    "get_last_checkpoint",
    "set_seed",
]
