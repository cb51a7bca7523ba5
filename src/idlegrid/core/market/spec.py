"""Resource specs: what a consumer asks of the hardware, parsed with errors that name the field.

In the spirit of SkyPilot's resources and Vast's filters::

    {"accelerators": ["RTX-4090", "A100-80GB"], "count": 2, "vram_gb": ">=16",
     "cpus": "4+", "reliability": ">=0.99", "region": {"not_in": ["ap-south"]},
     "max_price": 1.5, "min_tokens_per_s": 40}

Numbers take `>=X`, `>X`, `<=X`, `<X`, `==X`, `X+` (at least) or a bare number (at least,
except `max_price`, which is at most). Unknown fields and operators are errors, never
ignored: a typo in a constraint must not silently widen the search.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from idlegrid.core.market.hardware import canonical_gpu
from idlegrid.errors import InvalidRequest

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}
_BOUND = re.compile(r"^\s*(>=|<=|==|>|<)?\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(\+)?\s*$")


@dataclass(frozen=True)
class Bound:
    """A numeric constraint `value <op> limit`."""

    op: str
    limit: float

    def test(self, value: Any) -> Any:
        """Whether `value` (a number or a numpy array) satisfies the bound."""
        return _OPS[self.op](value, self.limit)

    def __str__(self) -> str:
        return f"{self.op}{self.limit:g}"


def parse_bound(field: str, raw: Any, default_op: str = ">=") -> Bound:
    """A Bound from `>=16`, `16+`, `16` or 16; InvalidRequest naming `field` otherwise."""
    if isinstance(raw, bool):
        raise InvalidRequest(
            f"{field}: expected a number or a comparison, got {raw!r}", param=field
        )
    if isinstance(raw, int | float):
        op, value = default_op, float(raw)
    elif isinstance(raw, str) and (m := _BOUND.match(raw)):
        op_s, num, plus = m.groups()
        if op_s and plus:
            raise InvalidRequest(
                f"{field}: use either an operator or '+', not both: {raw!r}", param=field
            )
        op, value = (op_s or (">=" if plus else default_op)), float(num)
    else:
        raise InvalidRequest(
            f"{field}: cannot read {raw!r}; write a number, 'N+', or one of >= > <= < == N",
            param=field,
        )
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{field}: {value} is out of range", param=field)
    return Bound(op, value)


@dataclass(frozen=True)
class RegionRule:
    """Regions allowed (`only`) or refused (`exclude`)."""

    only: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()

    def allows(self, region: str) -> bool:
        """Whether an offer in `region` may take the order."""
        return (self.only is None or region in self.only) and region not in self.exclude


def _regions(field: str, raw: Any) -> frozenset[str]:
    items = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(items, list | tuple)
        or not items
        or not all(isinstance(r, str) and r for r in items)
    ):
        raise InvalidRequest(f"{field}: expected a region name or a list of them", param=field)
    return frozenset(items)


def parse_region(raw: Any) -> RegionRule:
    """`"eu-west"`, `["eu-west", "us-east"]`, `{"in": [...]}` or `{"not_in": [...]}`."""
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"in", "not_in"}
        if unknown:
            raise InvalidRequest(
                f"region: unknown operator {sorted(unknown)[0]!r}; use in or not_in", param="region"
            )
        only = _regions("region.in", raw["in"]) if "in" in raw else None
        exclude = _regions("region.not_in", raw["not_in"]) if "not_in" in raw else frozenset()
        return RegionRule(only, exclude)
    return RegionRule(_regions("region", raw))


@dataclass(frozen=True)
class ResourceSpec:
    """Constraints on the hardware an order may run on. None means 'any'."""

    accelerators: frozenset[str] | None = None  # canonical models; any of them
    count: int = 1  # devices, placed as a gang
    vram_gb: Bound | None = None  # per device
    cpus: Bound | None = None
    ram_gb: Bound | None = None
    reliability: Bound | None = None
    region: RegionRule = RegionRule()
    max_price: float | None = None  # credits per device-hour (per 1M output tokens for batch)
    min_tokens_per_s: float | None = None
    max_ttft_ms: float | None = None
    min_link_gbps: float = 1.0  # between providers of a multi-provider gang
    verified: bool = False  # only hardware that passed a proof
    # Leases only: the workspace's disk, pip requirements, outbound network and runtime;
    # each is placed only where the provider's lease controls allow it (core/lease/controls).
    disk_gb: Bound | None = None
    pip: tuple[str, ...] = ()
    egress: bool = False
    runtime: str | None = None
    image: str | None = None  # an OCI image the provider has (runtime podman)

    def to_dict(self) -> dict[str, Any]:
        """The spec in the same form `parse_spec` reads."""
        out: dict[str, Any] = {"count": self.count}
        if self.accelerators is not None:
            out["accelerators"] = sorted(self.accelerators)
        for name in ("vram_gb", "cpus", "ram_gb", "reliability", "disk_gb"):
            if (b := getattr(self, name)) is not None:
                out[name] = str(b)
        if self.pip:
            out["pip"] = list(self.pip)
        if self.egress:
            out["egress"] = True
        if self.runtime is not None:
            out["runtime"] = self.runtime
        if self.image is not None:
            out["image"] = self.image
        if self.region.only is not None:
            out.setdefault("region", {})["in"] = sorted(self.region.only)
        if self.region.exclude:
            out.setdefault("region", {})["not_in"] = sorted(self.region.exclude)
        for name in ("max_price", "min_tokens_per_s", "max_ttft_ms"):
            if (v := getattr(self, name)) is not None:
                out[name] = v
        if self.min_link_gbps != 1.0:
            out["min_link_gbps"] = self.min_link_gbps
        if self.verified:
            out["verified"] = True
        return out


def _accelerators(raw: Any) -> tuple[frozenset[str], int | None]:
    """Models and an optional count from `"A100-80GB:8"`, a list, or `{model: count}`."""
    count: int | None = None
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, Mapping):
        counts = set(raw.values())
        if len(counts) != 1 or not all(isinstance(c, int) and c > 0 for c in counts):
            raise InvalidRequest(
                "accelerators: every model in a set needs the same positive count",
                param="accelerators",
            )
        items, count = list(raw), counts.pop()
    elif isinstance(raw, list | tuple) and raw:
        items = list(raw)
    else:
        raise InvalidRequest(
            "accelerators: expected a model, a list or a {model: count} set", param="accelerators"
        )
    models = set()
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise InvalidRequest(f"accelerators[{i}]: expected a model name", param="accelerators")
        name, _, n = item.partition(":")
        if n:
            if not n.isdigit() or int(n) == 0:
                raise InvalidRequest(f"accelerators[{i}]: bad count {n!r}", param="accelerators")
            if count is not None and count != int(n):
                raise InvalidRequest(
                    "accelerators: models in one set need the same count", param="accelerators"
                )
            count = int(n)
        try:
            models.add(canonical_gpu(name))
        except InvalidRequest as e:
            raise InvalidRequest(f"accelerators[{i}]: {e.message}", param="accelerators") from e
    return frozenset(models), count


def _positive(field: str, raw: Any, *, integer: bool = False, cap: float = 1e12) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or (integer and raw != int(raw)):
        raise InvalidRequest(
            f"{field}: expected a {'whole ' if integer else ''}number", param=field
        )
    if not math.isfinite(raw) or raw <= 0 or raw > cap:
        raise InvalidRequest(f"{field}: {raw} is out of range (0, {cap:g}]", param=field)
    return float(raw)


FIELDS = (
    "accelerators",
    "count",
    "vram_gb",
    "cpus",
    "ram_gb",
    "memory_gb",
    "reliability",
    "region",
    "max_price",
    "min_tokens_per_s",
    "max_ttft_ms",
    "min_link_gbps",
    "verified",
    "disk_gb",
    "pip",
    "egress",
    "runtime",
    "image",
)
LEASE_RUNTIMES = ("bwrap", "podman")
# An OCI image reference: [registry[:port]/]path[:tag][@sha256:digest], lower-case path parts
# (never an option: it reaches podman's argv on the provider).
IMAGE_REF = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]{1,5})?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)
# A requirement pip reads as a name with an optional version: never an option (`--index-url`),
# a path or a URL, which would let an order point the provider's pip elsewhere.
_REQUIREMENT = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(\[[A-Za-z0-9._,-]{1,100}\])?"
    r"((===?|~=|!=|<=|>=|<|>)[A-Za-z0-9.*+!_-]{1,64}(,(===?|~=|!=|<=|>=|<|>)[A-Za-z0-9.*+!_-]{1,64})*)?$"
)


def _pip(raw: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or len(items) > 64:
        raise InvalidRequest("pip: a list of at most 64 requirements", param="pip")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not _REQUIREMENT.match(item.strip()):
            raise InvalidRequest(
                f"pip[{i}]: {item!r} is not a requirement (name, optional extras and version)",
                param="pip",
            )
        out.append(item.strip())
    return tuple(out)


def parse_spec(raw: Any) -> ResourceSpec:
    """A ResourceSpec from JSON-like data; InvalidRequest pointing at the first bad field."""
    if raw is None:
        return ResourceSpec()
    if not isinstance(raw, Mapping):
        raise InvalidRequest("resources: expected an object", param="resources")
    unknown = [k for k in raw if k not in FIELDS]
    if unknown:
        raise InvalidRequest(
            f"resources.{unknown[0]}: unknown field; known: {', '.join(FIELDS)}",
            param=f"resources.{unknown[0]}",
        )
    kw: dict[str, Any] = {}
    try:
        count = None
        if "accelerators" in raw:
            kw["accelerators"], count = _accelerators(raw["accelerators"])
        if "count" in raw:
            n = int(_positive("count", raw["count"], integer=True, cap=4096))
            if count is not None and n != count:
                raise InvalidRequest(
                    f"count: {n} disagrees with accelerators' :{count}", param="count"
                )
            count = n
        kw["count"] = count or 1
        for name in ("vram_gb", "cpus", "ram_gb", "reliability", "disk_gb"):
            if name in raw:
                kw[name] = parse_bound(name, raw[name])
        if "pip" in raw:
            kw["pip"] = _pip(raw["pip"])
        if "egress" in raw:
            if not isinstance(raw["egress"], bool):
                raise InvalidRequest("egress: expected true or false", param="egress")
            kw["egress"] = raw["egress"]
        if "runtime" in raw:
            if raw["runtime"] not in LEASE_RUNTIMES:
                raise InvalidRequest(
                    f"runtime: one of {', '.join(LEASE_RUNTIMES)}, not {raw['runtime']!r}",
                    param="runtime",
                )
            kw["runtime"] = raw["runtime"]
        if "image" in raw:
            image = raw["image"]
            if not isinstance(image, str) or len(image) > 255 or not IMAGE_REF.match(image):
                raise InvalidRequest(
                    f"image: an OCI image reference (name[:tag][@sha256:digest]), not {image!r}",
                    param="image",
                )
            if kw.setdefault("runtime", "podman") != "podman":
                raise InvalidRequest("image: only the podman runtime runs images", param="image")
            kw["image"] = image
        if "memory_gb" in raw:
            kw["ram_gb"] = parse_bound("memory_gb", raw["memory_gb"])
        if "reliability" in kw and kw["reliability"].limit > 1:
            raise InvalidRequest("reliability: a ratio between 0 and 1", param="reliability")
        if "region" in raw:
            kw["region"] = parse_region(raw["region"])
        if "max_price" in raw:
            kw["max_price"] = _positive("max_price", raw["max_price"], cap=1e6)
        for name in ("min_tokens_per_s", "max_ttft_ms", "min_link_gbps"):
            if name in raw:
                kw[name] = _positive(name, raw[name], cap=1e7)
        if "verified" in raw:
            if not isinstance(raw["verified"], bool):
                raise InvalidRequest("verified: expected true or false", param="verified")
            kw["verified"] = raw["verified"]
    except InvalidRequest as e:
        param = e.param or "resources"
        raise InvalidRequest(f"resources.{e.message}", param=f"resources.{param}") from e
    return ResourceSpec(**kw)
