"""Truncated backpropagation through time, TBPTT(k1, k2), for PyTorch-Ignite."""

from ignite_tbptt.adaptive import AdaptiveK2
from ignite_tbptt.checks import check_state_passing
from ignite_tbptt.corpus import prepare_corpus, read_corpus
from ignite_tbptt.data import StreamBatches
from ignite_tbptt.evaluator import create_supervised_tbptt_evaluator, supervised_tbptt_evaluation_step
from ignite_tbptt.events import Tbptt_Events
from ignite_tbptt.handlers import ChunkedBatchWise, ChunkedEpochWise, ChunkProgressBar, ChunkUpdated, ChunkWise, TbpttLoss
from ignite_tbptt.horizon import GradientHorizon, gradient_horizon
from ignite_tbptt.schedule import ARTBP, Chunk, RandomLength
from ignite_tbptt.trainer import create_supervised_tbptt_trainer, reset_state, supervised_tbptt_training_step

__all__ = [
    "AdaptiveK2",
    "ARTBP",
    "check_state_passing",
    "Chunk",
    "ChunkedBatchWise",
    "ChunkedEpochWise",
    "ChunkProgressBar",
    "ChunkUpdated",
    "ChunkWise",
    "create_supervised_tbptt_evaluator",
    "create_supervised_tbptt_trainer",
    "gradient_horizon",
    "GradientHorizon",
    "prepare_corpus",
    "RandomLength",
    "read_corpus",
    "reset_state",
    "StreamBatches",
    "supervised_tbptt_evaluation_step",
    "supervised_tbptt_training_step",
    "Tbptt_Events",
    "TbpttLoss",
]
__version__ = "0.1.0"
