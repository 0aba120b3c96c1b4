"""The slot worker: closes slots, archives them into SQL, and hands them to a trainer."""

from app.worker.loop import Worker
from app.worker.trainer import NoTrainer, SlotTrainer, TrainOutcome, make_trainer

__all__ = ["NoTrainer", "SlotTrainer", "TrainOutcome", "Worker", "make_trainer"]
