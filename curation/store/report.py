"""What became of one item: the report the build's stages fill in and the accounts read.

Plain data, so the accounts (`curation.store.card`) need nothing of the build: an item's
`ItemEntry` (what was planned for it) and its `ItemReport` (what happened) are all the tally
takes, whether the rows came from a Ray build or from `m3-curate render`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("used", "skipped", "quarantined")


@dataclass(slots=True, frozen=True)
class ItemEntry:
    """The planned side of an item, for the accounts."""

    item_id: str
    split: str
    patient_key: str
    planned: int  # conversations planned
    notes: tuple[str, ...] = ()  # tasks left out for this item, and why


@dataclass(slots=True, frozen=True)
class ConversationOutcome:
    """One planned conversation: made (`used`), or set aside (`skipped`, `quarantined`) with
    the reason."""

    task: int  # index into the manifest's tasks
    variant: int
    status: str
    reason: str = ""


@dataclass(slots=True)
class ItemReport:
    """Failures, seconds, expert runs and cache hits of one item, and each planned
    conversation's outcome."""

    errors: dict[str, str] = field(default_factory=dict)  # stage or `expert(arg)` → reason
    seconds: dict[str, float] = field(default_factory=dict)  # stage → seconds spent on this item
    runs: dict[str, int] = field(default_factory=dict)  # expert → runs made for this item
    cached: dict[str, int] = field(default_factory=dict)  # expert → results found in the cache
    outcomes: list[ConversationOutcome] = field(default_factory=list)
    templates: dict[str, str] = field(default_factory=dict)  # template → hash

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 6)

    def count(self, counter: dict[str, int], expert: str) -> None:
        counter[expert] = counter.get(expert, 0) + 1

    def set_aside(self) -> list[ConversationOutcome]:
        return [o for o in self.outcomes if o.status != "used"]
