"""Idempotency keys derived from an event's identity."""

from app.ingestion.event_ids import derived_event_id, random_event_id


def test_the_same_event_gets_the_same_id() -> None:
    assert derived_event_id("u", "i", 10.0, "") == derived_event_id("u", "i", 10, "")


def test_each_part_of_the_identity_changes_the_id() -> None:
    base = derived_event_id("u", "i", 10.0, "view")
    variants = [
        derived_event_id("u2", "i", 10.0, "view"),
        derived_event_id("u", "i2", 10.0, "view"),
        derived_event_id("u", "i", 10.5, "view"),
        derived_event_id("u", "i", 10.0, "click"),
        derived_event_id("u", "i", 10.0, ""),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_parts_cannot_run_into_each_other() -> None:
    assert derived_event_id("ab", "c", 1.0, "") != derived_event_id("a", "bc", 1.0, "")


def test_ids_fit_the_interactions_table() -> None:
    assert len(derived_event_id("u" * 128, "i" * 128, 1e10, "t" * 64)) == 32
    assert len(random_event_id()) == 32
    assert random_event_id() != random_event_id()
