"""The worker's retry policy and its default trainer."""

from app.settings import Settings
from app.worker.loop import backoff_s
from app.worker.trainer import NoTrainer, make_trainer


def test_failed_passes_back_off_doubling_up_to_a_cap() -> None:
    assert [backoff_s(n, 1.0) for n in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_s(1000, 0.5, cap_s=5.0) == 5.0


def test_trainer_none_trains_nothing() -> None:
    trainer = make_trainer(Settings(trainer="none"), engine=None)  # type: ignore[arg-type]

    assert isinstance(trainer, NoTrainer)
    assert trainer.train(12) is None


def test_the_default_trainer_is_the_meta_update() -> None:
    from app.worker.meta_trainer import MetaTrainer

    settings = Settings(redis_url="redis://127.0.0.1:1/0", device="cpu")
    trainer = make_trainer(settings, engine=None)  # type: ignore[arg-type]

    assert isinstance(trainer, MetaTrainer)
