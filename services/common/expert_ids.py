"""The id-list syntax shared by `--experts`, `--local-experts`, `--cpus`, the Helm values and the
autoscaler's targets: "0-7", "0,2,5" or "0-3,8-11". Pure Python, so services that load no model
can use it."""

from __future__ import annotations

from typing import Iterable


def parse_expert_ids(spec: str, n_routed_experts: int | None = None) -> list[int]:
    """"0-3,8-11" -> sorted unique ids; ValueError names the bad part (or the ids out of range)."""
    ids = parse_id_list(spec, "expert")
    if n_routed_experts is not None:
        bad = [e for e in ids if not 0 <= e < n_routed_experts]
        if bad:
            raise ValueError(f"expert list '{spec}': ids {bad} outside [0, {n_routed_experts})")
    return ids


MAX_RANGE = 1 << 16  # ids one a-b range may name: more experts or CPUs than any host has


def parse_id_list(spec: str, noun: str) -> list[int]:
    """"0-3,8-11" -> sorted unique ids; ValueError ("<noun> list '...': ...") names the bad part."""
    ids: set[int] = set()
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        try:
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part),) * 2
            if lo > hi:
                raise ValueError
        except ValueError:
            raise ValueError(f"{noun} list '{spec}': '{part}' is not an id or an a-b range") from None
        if hi - lo >= MAX_RANGE:
            raise ValueError(f"{noun} list '{spec}': range '{part}' names over {MAX_RANGE} ids")
        ids.update(range(lo, hi + 1))
    if not ids:
        raise ValueError(f"{noun} list '{spec}' names no {noun}")
    return sorted(ids)


def format_id_list(ids: Iterable[int]) -> str:
    """(0, 1, 2, 3, 8) -> "0-3,8": the inverse of parse_id_list."""
    ids = sorted(ids)
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)
