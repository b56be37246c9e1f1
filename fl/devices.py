"""Device profiles for simulated federated-learning clients.

A client's :class:`DeviceProfile` says how many bytes its training step may use
(``budget_bytes``) and how fast it computes relative to this machine (``speed``: a step
that takes ``t`` seconds here takes ``t / speed`` on the device).

Two ways to make them:

* **Tier table** (``device_tiers.csv`` shipped beside this module, or your own CSV with the
  same columns ``tier,ram_bytes,share,train_memory_bytes,relative_speed,source``):
  :func:`load_tiers` then :func:`sample_devices` draws each client's tier by ``share``.
  The shipped table has five Android RAM tiers (2/3/4/6/8 GB) with shares from AnTuTu's 2018
  user statistics, renormalised to sum to 1, and a per-tier training-memory figure; the
  ``source`` column says where each figure comes from and which ones are assumptions.
* **Fractions of the keep-all peak**: :func:`devices_from_fractions` gives client budgets
  ``fraction * keep_all_peak_bytes`` (e.g. ``0.25,0.5,1.0``), round-robin or by a seeded
  draw.

The tier table is in real phone bytes (hundreds of MiB) while the example models peak at a
few MiB, so a table is mapped onto a model with :func:`scale_tiers`: every tier's
``train_memory_bytes`` is multiplied by one factor (:func:`memory_scale`) chosen so that the
anchor tier -- by default the share-weighted median tier, i.e. the typical device -- gets a
budget of exactly ``keep_all_peak_bytes``. The tiers keep their ratios (the 2 GB tier gets
half the 4 GB tier's budget, and so on), so roughly half the clients must plan below
keep-all and the rest have headroom.

:func:`parse_tiers_arg` turns a command-line value (a CSV path, ``default`` for the shipped
table, or fractions like ``0.3,0.6,1.2``) into a :class:`TiersArg` whose
:meth:`TiersArg.devices` builds the device list either way.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "COLUMNS",
    "DEFAULT_TIERS_FILE",
    "DeviceProfile",
    "Tier",
    "TiersArg",
    "devices_from_fractions",
    "load_tiers",
    "memory_scale",
    "parse_tiers_arg",
    "sample_devices",
    "scale_tiers",
]

COLUMNS = ("tier", "ram_bytes", "share", "train_memory_bytes", "relative_speed", "source")
DEFAULT_TIERS_FILE = "device_tiers.csv"
_SHARE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated client: its tier name, training-memory budget and relative speed."""

    tier: str
    budget_bytes: int
    speed: float


@dataclass(frozen=True)
class Tier:
    """One row of a tier table."""

    tier: str
    ram_bytes: int
    share: float
    train_memory_bytes: int
    relative_speed: float
    source: str = ""

    def profile(self) -> DeviceProfile:
        return DeviceProfile(self.tier, self.train_memory_bytes, self.relative_speed)


# --------------------------------------------------------------------------- loading


class _RowError(ValueError):
    pass


def _parse_int(text: str, column: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _RowError(f"column {column!r}: expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise _RowError(f"column {column!r}: expected a positive integer, got {value}")
    return value


def _parse_float(text: str, column: str, lo: float, hi: float, lo_open: bool) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        if hi == math.inf:
            bound = f"> {lo}" if lo_open else f">= {lo}"
        raise _RowError(f"column {column!r}: expected a number {bound}, got {text!r}")
    return value


def _read_table(text: str, where: str) -> list[Tier]:
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(h.strip() for h in (reader.fieldnames or ()))
    missing = [c for c in COLUMNS if c not in header]
    extra = [c for c in header if c not in COLUMNS]
    if missing or extra:
        raise ValueError(
            f"{where}: header must have the columns {','.join(COLUMNS)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "")
        )
    tiers: list[Tier] = []
    seen: set[str] = set()
    for raw_row in reader:  # DictReader skips blank lines
        line = reader.line_num
        if None in raw_row or any(v is None for v in raw_row.values()):
            raise ValueError(f"{where} line {line}: expected {len(COLUMNS)} fields")
        row = {k.strip(): v for k, v in raw_row.items()}
        name = row["tier"].strip()
        label = f"{where} line {line} (tier {name!r})"
        try:
            if not name:
                raise _RowError("column 'tier': empty")
            if name in seen:
                raise _RowError(f"column 'tier': duplicate tier {name!r}")
            ram = _parse_int(row["ram_bytes"], "ram_bytes")
            share = _parse_float(row["share"], "share", 0.0, 1.0, lo_open=False)
            train = _parse_int(row["train_memory_bytes"], "train_memory_bytes")
            if train > ram:
                raise _RowError(f"column 'train_memory_bytes': {train} exceeds ram_bytes {ram}")
            speed = _parse_float(
                row["relative_speed"], "relative_speed", 0.0, math.inf, lo_open=True
            )
            source = row["source"].strip()
            if not source:
                raise _RowError("column 'source': empty; say where the figures come from")
        except _RowError as e:
            raise ValueError(f"{label}: {e}") from None
        seen.add(name)
        tiers.append(Tier(name, ram, share, train, speed, source))
    if not tiers:
        raise ValueError(f"{where}: no tier rows")
    total = sum(t.share for t in tiers)
    if abs(total - 1.0) > _SHARE_TOLERANCE:
        raise ValueError(
            f"{where}: column 'share' sums to {total:.6g}, expected 1 (within "
            f"{_SHARE_TOLERANCE}); renormalise the shares"
        )
    # Renormalise away rounding so the shares sum to 1 up to float error.
    return [replace(t, share=t.share / total) for t in tiers]


def load_tiers(path: str | os.PathLike | None = None) -> list[Tier]:
    """Read a tier table; ``None`` reads the packaged ``device_tiers.csv``.

    Validates the header (exactly :data:`COLUMNS`, any order) and every value; errors name
    the file, line, tier and column. Shares must sum to 1 within 1e-3 and are then
    renormalised exactly.
    """
    if path is None:
        res = resources.files(__package__ or "fedplan.fl").joinpath(DEFAULT_TIERS_FILE)
        return _read_table(res.read_text(encoding="utf-8"), DEFAULT_TIERS_FILE)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"tier table {str(p)!r} does not exist")
    return _read_table(p.read_text(encoding="utf-8"), str(p))


# --------------------------------------------------------------------------- scaling


def _anchor_tier(tiers: Sequence[Tier], anchor: str) -> Tier:
    if not tiers:
        raise ValueError("no tiers given")
    by_memory = sorted(tiers, key=lambda t: t.train_memory_bytes)
    if anchor == "median":
        total = sum(t.share for t in by_memory)
        acc = 0.0
        for t in by_memory:
            acc += t.share
            if acc >= total / 2 - 1e-12:
                return t
        return by_memory[-1]
    if anchor == "min":
        return by_memory[0]
    if anchor == "max":
        return by_memory[-1]
    for t in tiers:
        if t.tier == anchor:
            return t
    names = ", ".join(t.tier for t in tiers)
    raise ValueError(
        f"anchor must be 'median', 'min', 'max' or a tier name ({names}); got {anchor!r}"
    )


def memory_scale(
    tiers: Sequence[Tier], keep_all_peak_bytes: int, *, anchor: str = "median"
) -> float:
    """Factor that maps the anchor tier's ``train_memory_bytes`` onto ``keep_all_peak_bytes``.

    ``anchor`` is ``"median"`` (share-weighted median tier by training memory: the tier of
    the typical client), ``"min"``, ``"max"`` or a tier name.
    """
    if keep_all_peak_bytes <= 0:
        raise ValueError(f"keep_all_peak_bytes must be positive, got {keep_all_peak_bytes}")
    return keep_all_peak_bytes / _anchor_tier(tiers, anchor).train_memory_bytes


def scale_tiers(
    tiers: Sequence[Tier], keep_all_peak_bytes: int, *, anchor: str = "median"
) -> list[Tier]:
    """Tiers with ``train_memory_bytes`` scaled by :func:`memory_scale` (ratios kept).

    The anchor tier's budget becomes exactly ``keep_all_peak_bytes``; others are rounded to
    the nearest byte. ``ram_bytes``, shares and speeds are unchanged (``train_memory_bytes``
    may then exceed ``ram_bytes``: the scaled table describes a model, not a phone).
    """
    scale = memory_scale(tiers, keep_all_peak_bytes, anchor=anchor)
    anchor_name = _anchor_tier(tiers, anchor).tier
    out = []
    for t in tiers:
        budget = (
            int(keep_all_peak_bytes)
            if t.tier == anchor_name
            else max(1, round(t.train_memory_bytes * scale))
        )
        out.append(replace(t, train_memory_bytes=budget))
    return out


# --------------------------------------------------------------------------- sampling


def _check_clients(num_clients: int) -> int:
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    return int(num_clients)


def sample_devices(
    num_clients: int, tiers: Sequence[Tier], seed: int, *, method: str = "draw"
) -> list[DeviceProfile]:
    """One :class:`DeviceProfile` per client, its tier chosen by ``share``.

    ``method="draw"``: independent seeded draws (counts follow the shares up to sampling
    noise). ``method="quota"``: exact counts by largest remainder, in seeded random order
    (useful for few clients). Budgets are the tiers' ``train_memory_bytes`` -- pass tiers
    through :func:`scale_tiers` first to map them onto a small model.
    """
    k = _check_clients(num_clients)
    tiers = list(tiers)
    if not tiers:
        raise ValueError("no tiers given")
    shares = np.array([t.share for t in tiers], dtype=np.float64)
    if shares.sum() <= 0:
        raise ValueError("tier shares sum to 0")
    shares = shares / shares.sum()
    rng = np.random.default_rng(seed)
    if method == "draw":
        picks = rng.choice(len(tiers), size=k, p=shares)
    elif method == "quota":
        exact = shares * k
        counts = np.floor(exact).astype(np.int64)
        rest = k - int(counts.sum())
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:rest]] += 1
        picks = rng.permutation(np.repeat(np.arange(len(tiers)), counts))
    else:
        raise ValueError(f"method must be 'draw' or 'quota', got {method!r}")
    return [tiers[i].profile() for i in picks]


def devices_from_fractions(
    num_clients: int,
    fractions: Sequence[float],
    keep_all_peak_bytes: int,
    seed: int,
    speeds: Sequence[float] | None = None,
    *,
    assignment: str = "round_robin",
) -> list[DeviceProfile]:
    """Clients whose budgets are fractions of the model's keep-all peak.

    Client budgets are ``round(fraction * keep_all_peak_bytes)`` (so 1.0 is exactly the
    keep-all peak). ``assignment``: ``"round_robin"`` (client ``i`` gets
    ``fractions[i % len(fractions)]``; ``seed`` unused), ``"shuffled"`` (the same counts in
    seeded random order) or ``"random"`` (independent uniform seeded draws). ``speeds``,
    one per fraction, default 1.0. Tier names are ``"f<fraction>"``.
    """
    k = _check_clients(num_clients)
    fr = [float(f) for f in fractions]
    if not fr:
        raise ValueError("fractions is empty")
    for f in fr:
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"fractions must be positive numbers, got {f!r}")
    if keep_all_peak_bytes <= 0:
        raise ValueError(f"keep_all_peak_bytes must be positive, got {keep_all_peak_bytes}")
    sp = [1.0] * len(fr) if speeds is None else [float(s) for s in speeds]
    if len(sp) != len(fr):
        raise ValueError(f"speeds has {len(sp)} entries, fractions has {len(fr)}")
    for s in sp:
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"speeds must be positive numbers, got {s!r}")
    if assignment == "round_robin":
        picks = [i % len(fr) for i in range(k)]
    elif assignment == "shuffled":
        picks = np.random.default_rng(seed).permutation([i % len(fr) for i in range(k)]).tolist()
    elif assignment == "random":
        picks = np.random.default_rng(seed).integers(0, len(fr), size=k).tolist()
    else:
        raise ValueError(
            f"assignment must be 'round_robin', 'shuffled' or 'random', got {assignment!r}"
        )
    return [
        DeviceProfile(f"f{fr[i]:g}", max(1, round(fr[i] * keep_all_peak_bytes)), sp[i])
        for i in picks
    ]


# --------------------------------------------------------------------------- CLI argument


@dataclass(frozen=True)
class TiersArg:
    """A parsed ``--tiers`` value: either a tier table or a list of peak fractions."""

    tiers: tuple[Tier, ...] | None = None
    fractions: tuple[float, ...] | None = None
    path: str | None = None

    def devices(
        self,
        num_clients: int,
        keep_all_peak_bytes: int,
        seed: int,
        *,
        anchor: str = "median",
        assignment: str = "round_robin",
    ) -> list[DeviceProfile]:
        """Tier table: :func:`scale_tiers` onto the model, then :func:`sample_devices`.
        Fractions: :func:`devices_from_fractions`."""
        if self.fractions is not None:
            return devices_from_fractions(
                num_clients, self.fractions, keep_all_peak_bytes, seed, assignment=assignment
            )
        assert self.tiers is not None
        scaled = scale_tiers(self.tiers, keep_all_peak_bytes, anchor=anchor)
        return sample_devices(num_clients, scaled, seed)


def parse_tiers_arg(text: str) -> TiersArg:
    """Parse ``"default"`` (the packaged table), a CSV path, or fractions ``"0.3,0.6,1.2"``."""
    raw = str(text).strip()
    usage = (
        "expected 'default', a tier-table CSV path, or comma-separated positive fractions "
        f"of the keep-all peak like '0.3,0.6,1.2'; got {text!r}"
    )
    if not raw:
        raise ValueError(usage)
    if raw.lower() == "default":
        return TiersArg(tiers=tuple(load_tiers()), path=DEFAULT_TIERS_FILE)
    if os.path.isfile(raw):
        return TiersArg(tiers=tuple(load_tiers(raw)), path=raw)
    if raw.lower().endswith(".csv") or os.sep in raw:
        raise ValueError(f"tier table {raw!r} does not exist ({usage})")
    try:
        fractions = tuple(float(p) for p in raw.split(","))
    except ValueError:
        raise ValueError(usage) from None
    if not all(math.isfinite(f) and f > 0 for f in fractions):
        raise ValueError(usage)
    return TiersArg(fractions=fractions)
