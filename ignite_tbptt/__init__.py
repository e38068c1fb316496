"""Truncated backpropagation through time for PyTorch-Ignite.

>>> from ignite_tbptt import create_supervised_tbptt_trainer, Tbptt_Events
"""

from ignite_tbptt.events import Tbptt_Events
from ignite_tbptt.schedule import Chunk
from ignite_tbptt.trainer import create_supervised_tbptt_trainer, reset_state, supervised_tbptt_training_step

__all__ = ["Chunk", "Tbptt_Events", "create_supervised_tbptt_trainer", "reset_state", "supervised_tbptt_training_step"]
__version__ = "0.1.0"
