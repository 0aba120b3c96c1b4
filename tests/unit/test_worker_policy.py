"""The worker's retry policy and its default trainer."""

from app.settings import Settings
from app.worker.loop import backoff_s
from app.worker.trainer import NoTrainer, make_trainer


def test_failed_passes_back_off_doubling_up_to_a_cap() -> None:
    assert [backoff_s(n, 1.0) for n in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_s(1000, 0.5, cap_s=5.0) == 5.0


def test_the_default_trainer_trains_nothing() -> None:
    trainer = make_trainer(Settings(), engine=None)  # type: ignore[arg-type]

    assert isinstance(trainer, NoTrainer)
    assert trainer.train(12) is None
