"""Turning slot stream entries into SQL rows (no services needed)."""

import pytest

from app.storage.repo import InteractionRow
from app.worker.archive import MalformedEntry, interaction_of

ENTRY = {
    "event_id": "e1",
    "user_id": "u1",
    "item_id": "i1",
    "ts": "1700000000.25",
    "value": "2.5",
    "type": "click",
    "late": "1",
    "event_slot": "472221",
}


def test_an_entry_becomes_a_row_of_its_buffer_slot() -> None:
    row = interaction_of("1-0", ENTRY, slot_id=472222)

    assert row == InteractionRow(
        event_id="e1",
        user_id="u1",
        item_id="i1",
        ts=1_700_000_000.25,
        value=2.5,
        type="click",
        slot_id=472222,
        late=True,
    )


def test_an_empty_type_is_stored_as_none_and_late_defaults_to_false() -> None:
    entry = {key: value for key, value in ENTRY.items() if key != "late"} | {"type": ""}

    row = interaction_of("1-0", entry, slot_id=1)

    assert row.type is None and row.late is False


@pytest.mark.parametrize(
    "broken",
    [
        {"event_id": None},
        {"ts": "yesterday"},
        {"value": ""},
    ],
)
def test_a_malformed_entry_names_itself(broken: dict[str, str | None]) -> None:
    entry = {key: value for key, value in (ENTRY | broken).items() if value is not None}

    with pytest.raises(MalformedEntry, match="stream entry 7-3 of slot 9"):
        interaction_of("7-3", entry, slot_id=9)
