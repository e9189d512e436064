"""Which member reduces which part of the vector: a pure function every member computes alike."""

from __future__ import annotations

from dataclasses import dataclass

from antorcha.averaging.base import AveragingGroup

# Elements per message: 1 MiB of fp32, well under libp2p's 4 MiB unary message limit.
CHUNK_ELEMENTS = 256 * 1024


@dataclass(frozen=True)
class Span:
    member_index: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def chunks(self, chunk_elements: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
        """(start, stop) of each chunk, in vector coordinates."""
        return [(s, min(s + chunk_elements, self.stop)) for s in range(self.start, self.stop, chunk_elements)]


def span_layout(total: int, group: AveragingGroup) -> list[Span]:
    """Split [0, total) into one contiguous span per member, sized by reduce_fraction (integer math
    on the boundaries so every member gets exactly the same layout)."""
    fractions = [max(0.0, m.reduce_fraction) for m in group.members]
    if sum(fractions) <= 0:
        raise ValueError(f"group {group.group_id} has no member that can reduce")
    # Scale to integer weights first (relative to the largest, so tiny fractions survive): float sums
    # in different orders must not move a boundary.
    largest = max(fractions)
    units = [round(f / largest * 1_000_000) for f in fractions]
    total_units = sum(units)
    spans, start, acc = [], 0, 0
    for i, u in enumerate(units):
        acc += u
        stop = total * acc // total_units
        spans.append(Span(i, start, stop))
        start = stop
    return spans
