"""Topology model: JSON in/out and validation errors that name the bad field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlegrid.core.planner import parse_topology, topology_to_json
from idlegrid.core.planner.scenarios import SCENARIOS, tiny
from idlegrid.errors import InvalidRequest


def _bad(raw: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_topology(raw)
    return info.value


def test_tiny_parses_with_derived_sizes() -> None:
    topo = parse_topology(tiny())
    assert topo.n == 8 and topo.stages == 4 and topo.data_parallel == 2
    assert topo.layers_per_stage() == [6, 6, 6, 6]
    # batch 64 over 2 replicas, seq 1024, hidden 1024, bf16
    assert topo.activation_bytes() == 32 * 1024 * 1024 * 2
    assert topo.micro_batches() == 16
    assert topo.regions() == ["Frankfurt", "Virginia"]


def test_non_square_row_names_the_row() -> None:
    raw = tiny()
    raw["latency_ms"][3] = raw["latency_ms"][3][:-1]
    err = _bad(raw)
    assert err.param == "latency_ms[3]" and "square" in err.message


def test_wrong_row_count_names_the_matrix() -> None:
    raw = tiny()
    raw["bandwidth_gbps"] = raw["bandwidth_gbps"][:7]
    assert _bad(raw).param == "bandwidth_gbps"


def test_negative_bandwidth_names_the_cell() -> None:
    raw = tiny()
    raw["bandwidth_gbps"][1][2] = -2.0
    err = _bad(raw)
    assert err.param == "bandwidth_gbps[1][2]" and "negative" in err.message


def test_zero_bandwidth_between_devices_is_refused() -> None:
    raw = tiny()
    raw["bandwidth_gbps"][0][5] = 0
    assert _bad(raw).param == "bandwidth_gbps[0][5]"


def test_negative_latency_and_non_numbers() -> None:
    raw = tiny()
    raw["latency_ms"][2][0] = -1
    assert _bad(raw).param == "latency_ms[2][0]"
    raw = tiny()
    raw["latency_ms"][2][0] = "fast"
    assert _bad(raw).param == "latency_ms[2][0]"


def test_more_stages_than_devices() -> None:
    raw = tiny()
    raw["stages"], raw["data_parallel"] = 9, 1
    err = _bad(raw)
    assert err.param == "stages" and "only 8 devices" in err.message


def test_shape_must_cover_devices() -> None:
    raw = tiny()
    raw["data_parallel"] = 3
    assert _bad(raw).param == "data_parallel"


def test_model_fits_nowhere() -> None:
    raw = tiny()
    raw["model"]["params"] = 400e9
    err = _bad(raw)
    assert err.param == "model" and "fits nowhere" in err.message


def test_one_device_too_small_is_named() -> None:
    raw = tiny()
    raw["devices"][5]["memory_gb"] = 1
    assert _bad(raw).param == "devices[5].memory_gb"


@pytest.mark.parametrize(
    ("path", "value", "param"),
    [
        (("model", "dtype"), "fp13", "model.dtype"),
        (("model", "layers"), 0, "model.layers"),
        (("model", "mfu"), 1.5, "model.mfu"),
        (("compression",), {"activation_bits": 5}, "compression.activation_bits"),
        (("objective",), "fastest", "objective"),
        (("devices", 2, "tflops"), -3, "devices[2].tflops"),
        (("devices", 4, "id"), "gpu00", "devices[4].id"),
    ],
)
def test_field_errors(path: tuple[Any, ...], value: Any, param: str) -> None:
    raw = tiny()
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert _bad(raw).param == param


def test_missing_field() -> None:
    raw = tiny()
    del raw["model"]["seq"]
    assert _bad(raw).param == "model.seq"
    raw = tiny()
    del raw["stages"]
    assert _bad(raw).param == "stages"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenarios_round_trip_through_json(name: str) -> None:
    topo = parse_topology(SCENARIOS[name]())
    again = parse_topology(json.loads(json.dumps(topology_to_json(topo))))
    assert again == topo


@settings(max_examples=40, deadline=None)
@given(
    n_regions=st.integers(1, 3),
    per_region=st.integers(1, 3),
    stages=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_random_topologies_round_trip(
    n_regions: int, per_region: int, stages: int, seed: int
) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    n = n_regions * per_region * stages
    raw = {
        "devices": [
            {"id": f"d{i}", "region": f"r{i % n_regions}", "tflops": float(rng.uniform(10, 300))}
            for i in range(n)
        ],
        "latency_ms": rng.uniform(0, 200, (n, n)).round(3).tolist(),
        "bandwidth_gbps": rng.uniform(0.1, 10, (n, n)).round(3).tolist(),
        "model": {"layers": stages * 2, "hidden": 64, "seq": 32, "batch": 8},
        "stages": stages,
        "data_parallel": n // stages,
    }
    topo = parse_topology(copy.deepcopy(raw))
    assert parse_topology(topology_to_json(topo)) == topo
    assert topo.latency_s().shape == (n, n)
