"""The fake engine, the engine registry and the start-up benchmark: no model needed."""

from __future__ import annotations

import sys
import types
from itertools import count, islice

import pytest

from idlegrid.agent.hardware.benchmark import Speed, measure_speed
from idlegrid.engines.base import Engine, SamplingParams, generate_text
from idlegrid.engines.fake import BOS_ID, DELAY_ENV, EOS_ID, FakeEngine
from idlegrid.engines.registry import engine_names, load_engine
from idlegrid.errors import EngineError, InvalidRequest

GREEDY = SamplingParams(temperature=0.0)


def test_fake_is_an_engine_with_byte_tokens() -> None:
    engine = FakeEngine()
    assert isinstance(engine, Engine)
    ids = engine.tokenize("hé")
    assert ids[0] == BOS_ID and len(ids) == 1 + len("hé".encode())
    assert engine.tokenize("hé", add_bos=False) == ids[1:]
    assert engine.detokenize(ids) == "hé".encode()
    assert engine.is_end(EOS_ID) and not engine.is_end(ids[1])


def test_greedy_output_is_a_function_of_the_context_only() -> None:
    a = generate_text(FakeEngine(), "abc", max_tokens=30, params=GREEDY).text
    b = generate_text(FakeEngine(token_delay=0), "abc", max_tokens=30, params=GREEDY).text
    c = generate_text(FakeEngine(), "abd", max_tokens=30, params=GREEDY).text
    assert a == b != c


def test_unseeded_sampling_varies() -> None:
    engine = FakeEngine()
    params = SamplingParams(temperature=1.0, seed=None)
    texts = {generate_text(engine, "x", max_tokens=30, params=params).text for _ in range(4)}
    assert len(texts) >= 3


def test_generation_stops_when_the_context_is_full() -> None:
    engine = FakeEngine(context_length=20)
    prompt = engine.tokenize("0123456789")
    assert len(list(engine.generate(prompt, GREEDY))) == 20 - len(prompt)


def test_bad_prompts_are_refused() -> None:
    engine = FakeEngine()
    with pytest.raises(InvalidRequest):
        next(engine.generate([], GREEDY))
    with pytest.raises(InvalidRequest):
        next(engine.generate([BOS_ID, 100_000], GREEDY))


def test_token_delay_comes_from_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DELAY_ENV, "0.25")
    assert FakeEngine().token_delay == 0.25
    assert FakeEngine(token_delay=0.01).token_delay == 0.01  # the argument wins
    monkeypatch.setenv(DELAY_ENV, "slow")
    with pytest.raises(EngineError):
        FakeEngine()


def test_registry_loads_builtin_names_and_plugin_paths() -> None:
    assert {"llama.cpp", "llamacpp", "torch", "fake"} <= set(engine_names())
    engine = load_engine("fake", "gemma3:270m", token_delay=0.0)
    assert isinstance(engine, FakeEngine) and engine.model_id == "gemma3:270m"
    plugin = load_engine("idlegrid.engines.fake:FakeEngine", "m:1", context_length=64)
    assert plugin.context_length == 64 and plugin.describe()["engine"] == "fake"


def test_registry_import_stays_light() -> None:
    import subprocess

    code = (
        "import sys, idlegrid.engines.registry, idlegrid.engines.models,"
        " idlegrid.agent.hardware.probe, idlegrid.agent.hardware.benchmark;"
        " print([m for m in ('torch', 'llama_cpp', 'transformers',"
        " 'gguf', 'pynvml', 'numpy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tensorrt", "unknown engine"),
        ("no_such_module_xyz:Engine", "cannot import"),
        ("idlegrid.engines.fake:NoSuchClass", "has no"),
        ("idlegrid.engines.fake:", "module:Class"),
        ("idlegrid.engines.fake:END_MARKER", "not callable"),
    ],
)
def test_registry_errors_are_clear(spec: str, message: str) -> None:
    with pytest.raises(EngineError, match=message) as info:
        load_engine(spec, "gemma3:270m")
    assert info.value.data["engine"] == spec


def test_registry_wraps_plugin_failures_and_checks_the_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("idlegrid_test_plugin")

    class Broken:
        def __init__(self, model_id: str, **kwargs: object) -> None:
            raise RuntimeError("no GPU")

    class NotAnEngine:
        def __init__(self, model_id: str, **kwargs: object) -> None:
            pass

    module.Broken, module.NotAnEngine = Broken, NotAnEngine
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(EngineError, match="no GPU"):
        load_engine("idlegrid_test_plugin:Broken", "m")
    with pytest.raises(EngineError, match="Engine interface"):
        load_engine("idlegrid_test_plugin:NotAnEngine", "m")


def test_measure_speed_with_an_injected_clock() -> None:
    ticks = count()
    speed = measure_speed(
        FakeEngine(), prompt_tokens=64, decode_tokens=16, clock=lambda: next(ticks)
    )
    # Three clock reads, one second apart: before the first token, after it, after the rest.
    assert speed == Speed(prefill_tps=64.0, decode_tps=16.0, ttft_s=1.0, prompt_tokens=64,
                          decode_tokens=16)  # fmt: skip
    assert speed.to_dict()["decode_tps"] == 16.0


def test_measure_speed_fits_small_contexts() -> None:
    speed = measure_speed(FakeEngine(context_length=40), prompt_tokens=128, decode_tokens=32)
    assert speed.prompt_tokens + speed.decode_tokens < 40
    assert speed.prefill_tps > 0 and speed.decode_tps > 0 and speed.ttft_s > 0


def test_measure_speed_uses_exactly_the_prompt_length() -> None:
    class Recording(FakeEngine):
        def generate(self, prompt_ids, params):  # type: ignore[no-untyped-def]
            self.seen.append((len(prompt_ids), params.temperature))
            return super().generate(prompt_ids, params)

    engine = Recording()
    engine.seen = []
    measure_speed(engine, prompt_tokens=100, decode_tokens=4)
    assert engine.seen[-1] == (100, 0.0)
    assert list(islice(engine.generate([BOS_ID], GREEDY), 1))  # still usable afterwards
