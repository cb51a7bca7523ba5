"""PyTorch + transformers engine that serves the same GGUF file as llama.cpp, dequantized.

transformers can read Gemma 3 GGUF files itself, but its loader needs `accelerate`, its
metadata reader (gguf's GGUFReader) spends ~20 s on a 262k-token vocabulary, and its
tokenizer rebuilds BPE merges for ~30 s. So this module reads the file directly: a small
GGUF parser, dequantization with the `gguf` package (Q8_0 in torch: gguf's numpy path
takes ~10 s on the embedding), a transformers `Gemma3ForCausalLM` built from the metadata,
and llama.cpp's SentencePiece tokenizer re-implemented, so that both engines see the same
token ids. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import heapq
import mmap
import os
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idlegrid.engines import parallel
from idlegrid.engines.base import SamplingParams, check_prompt
from idlegrid.engines.commit import Recorder
from idlegrid.engines.llamacpp import default_threads
from idlegrid.engines.models import resolve_model
from idlegrid.engines.steps import SeededPick, Steps
from idlegrid.errors import EngineError

DEFAULT_CONTEXT = 8192
_UINT64 = (1 << 64) - 1
INSTALL_HINT = "pip install 'idlegrid[torch]'"

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Texts llama.cpp treats as end-of-generation besides EOS (llama-vocab.cpp): they become
# control tokens there, so they also render as nothing.
EOG_TEXTS = {"<end_of_turn>", "</s>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>",
             "<|end_of_text|>", "<EOT>", "_<EOT>", "<|eom_id|>", "<end_of_utterance>",
             "<|return|>", "<|call|>"}  # fmt: skip


class TorchEngine(SeededPick):
    """Gemma 3 GGUF weights, dequantized, run by transformers with our own decode loop."""

    name = "torch"

    def __init__(
        self,
        model_id: str,
        *,
        model_path: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        context_length: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise EngineError(
                f"the torch engine needs torch and transformers: {INSTALL_HINT}",
                engine=self.name,
                detail=str(exc),
            ) from exc
        self._torch = torch
        spec = resolve_model(model_id, model_path=model_path)
        self.model_id = spec.id
        self._path = spec.gguf_path
        torch.set_num_threads(threads or default_threads())
        self._device = torch.device(device or _best_device(torch))
        self._dtype = getattr(torch, dtype)
        gguf = GgufFile(self._path)
        try:
            arch = gguf.meta.get("general.architecture")
            if arch != "gemma3":
                raise EngineError(f"torch engine supports gemma3 GGUF files, not {arch!r}",
                                  engine=self.name, detail=str(self._path))  # fmt: skip
            self._vocab = SpmVocab.from_gguf(gguf.meta)
            self._config = _gemma3_config(gguf.meta, len(self._vocab.tokens))
            state_dict = _gemma3_state_dict(torch, gguf)
        finally:
            gguf.close()
        self._model = _build_model(torch, self._config, state_dict)
        self._model.to(device=self._device, dtype=self._dtype).eval()
        trained = int(self._config.max_position_embeddings)
        self._context_length = min(context_length or DEFAULT_CONTEXT, trained)
        self._chat_template = gguf.meta.get("tokenizer.chat_template")
        self._versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        self.recorder: Recorder | None = None  # set by the agent to commit one generation
        self.steps: Steps | None = None  # the current generation's sampler state

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids as llama.cpp makes them (special tokens in `text` are parsed)."""
        return self._vocab.encode(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """UTF-8 bytes of the ids; control tokens render as nothing, as in llama.cpp."""
        return self._vocab.decode(ids)

    def is_end(self, token_id: int) -> bool:
        """EOS and end-of-turn tokens."""
        return token_id in self._vocab.eog_ids

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Prefill `prompt_ids` once, then decode one token per step with a KV cache.

        Sampling is seeded Gumbel-max keyed by (seed, absolute position), so a verifier
        replays each choice from its own logits; the last hidden state behind every token
        goes to `recorder` when one is set.
        """
        torch = self._torch
        from transformers import DynamicCache

        ids = list(prompt_ids)
        check_prompt(ids, self._context_length, len(self._vocab.tokens))
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        cache = DynamicCache(config=self._config)
        step = torch.tensor([ids], dtype=torch.long, device=self._device)
        n = len(ids)
        recorder = self.recorder
        steps = self.steps = Steps(ids, params, len(self._vocab.tokens))
        while True:
            # inference_mode per call, never held across a yield, so it cannot leak into
            # the caller's code between tokens.
            with torch.inference_mode():
                out = self._model.model(input_ids=step, past_key_values=cache, use_cache=True)
                state = out.last_hidden_state[0, -1:]
                logits = self._logits(state)[0]
            token_id = steps.pick(self._pick, logits, seed, n)
            if recorder is not None:
                recorder.add(token_id, state[0].float().cpu().numpy(), steps.last)
            yield token_id
            n += 1
            if n >= self._context_length:
                return
            step = torch.tensor([[token_id]], dtype=torch.long, device=self._device)

    def _logits(self, states: Any) -> np.ndarray:
        torch = self._torch
        n = states.shape[0]
        if n == 1 and self._device.type == "cpu":
            states = torch.cat([states, torch.zeros_like(states)])
        # W @ states.T, not lm_head(states): on CPU, MKL multiplies the 262k x 640 output
        # layer 2.5-6x faster this way round with two columns or more than it runs
        # states @ W.T (a GEMV at one row), measured: 13 vs 40 ms one row (padded to two),
        # 14 vs 75 ms four, 31 vs 76 ms eight, 158 vs 190 ms 64 (bench/bench_torch_batched.py).
        w = self._model.lm_head.weight
        logits = (w @ states.T)[:, :n].T.contiguous().float()
        cap = getattr(self._config, "final_logit_softcapping", None)
        if cap:
            logits = self._torch.tanh(logits / cap) * cap
        out: np.ndarray = logits.cpu().numpy()
        return out

    def prefill_states(self, ids: Sequence[int]) -> np.ndarray:
        """Last hidden state of every position of `ids`, in one forward pass (verifier)."""
        torch = self._torch
        with torch.inference_mode():
            step = torch.tensor([list(ids)], dtype=torch.long, device=self._device)
            out = self._model.model(input_ids=step, use_cache=False)
            states: np.ndarray = out.last_hidden_state[0].float().cpu().numpy()
        return states

    def logits_of(self, states: np.ndarray) -> np.ndarray:
        """Logits for hidden states, through the tied output layer at serving precision."""
        torch = self._torch
        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(states)).to(self._device, self._dtype)
            return self._logits(h)

    def det_class(self) -> str:
        """engine/version/dtype/device/threads: equal classes compute the same bits."""
        d = self.describe()
        return f"torch/{d['version']}/{d['dtype']}/{d['device']}/t{d['threads']}"

    def audit(
        self, context_ids: Sequence[int], c: Any, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> Any:
        """Recompute a commitment in one prefill (verifier mode)."""
        from idlegrid.engines.commit import recompute

        return recompute(self, context_ids, c, max_new_tokens, stop, self._context_length)

    @property
    def chat_template(self) -> str | None:
        """`tokenizer.chat_template` from the GGUF metadata (None for base models)."""
        return self._chat_template

    @property
    def context_length(self) -> int:
        """Maximum tokens per sequence."""
        return self._context_length

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of a sequence takes at serving precision (every layer in
        full: the batched path keeps sliding-window layers whole, engines/torch_batched)."""
        c = self._config
        size = self._torch.empty((), dtype=self._dtype).element_size()
        return parallel.kv_bytes_per_token(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.head_dim, size
        )

    def describe(self) -> dict[str, Any]:
        """Engine facts for the determinism class."""
        return {
            "engine": self.name,
            "version": self._versions["torch"],
            "transformers": self._versions["transformers"],
            "model": self.model_id,
            "model_file": self._path.name,
            "dtype": str(self._dtype).removeprefix("torch."),
            "device": str(self._device),
            "threads": self._torch.get_num_threads(),
            "context_length": self._context_length,
        }

    def close(self) -> None:
        """Drop the model; the GC frees its memory."""
        self._model = None


def _best_device(torch: Any) -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


# --- GGUF file ------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GgufFile:
    """Metadata and raw tensor bytes of a GGUF v2/v3 file, memory-mapped."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close(); tensors view the map)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version < 2:
            self.close()
            raise EngineError(f"{path} is not a GGUF v2+ file", engine="torch", detail=str(path))
        self._pos = 24
        self.meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.meta[key] = self._value(vtype)
        self.tensors: dict[str, tuple[int, tuple[int, ...], int]] = {}
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._pos)
            self._pos += 8 * n_dims
            ggml_type, offset = self._unpack("<IQ")
            self.tensors[name] = (ggml_type, tuple(dims), offset)
        align = int(self.meta.get("general.alignment", 32))
        self._data = (self._pos + align - 1) // align * align

    def raw(self, name: str) -> tuple[int, tuple[int, ...], np.ndarray]:
        """(ggml type, dims with the fastest-varying first, the tensor's bytes)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        ggml_type, dims, offset = self.tensors[name]
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        nbytes = int(np.prod(dims)) // block * size
        start = self._data + offset
        return ggml_type, dims, np.frombuffer(self._map, np.uint8, nbytes, start)

    def close(self) -> None:
        """Unmap and close the file (tensors read from it must have been copied)."""
        with contextlib.suppress(BufferError):  # a view is still alive: the GC unmaps later
            self._map.close()
        self._file.close()

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        self._pos = start + n
        return self._map[start : start + n].decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._unpack("<IQ")
            if itype in _NUMPY:
                arr = np.frombuffer(self._map, _NUMPY[itype], count, self._pos)
                self._pos += arr.nbytes
                return arr.copy()
            return [self._value(itype) for _ in range(count)]
        (value,) = self._unpack(_SCALARS[vtype])
        return value


def _dequantize(torch: Any, ggml_type: int, dims: tuple[int, ...], data: np.ndarray) -> Any:
    from gguf import GGMLQuantizationType, dequantize

    shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
    if ggml_type == GGMLQuantizationType.Q8_0:
        # gguf's numpy path takes ~10 s on a 262k x 640 embedding; torch takes well under 1 s.
        blocks = torch.from_numpy(data.reshape(-1, 34).copy())
        scale = blocks[:, :2].contiguous().view(torch.float16).float()
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * scale).reshape(shape)
    values = np.asarray(dequantize(data, GGMLQuantizationType(ggml_type)), dtype=np.float32)
    return torch.from_numpy(values.reshape(shape).copy())


# --- Gemma 3 in transformers ----------------------------------------------------------

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


def _gemma3_config(meta: dict[str, Any], vocab_size: int) -> Any:
    from transformers import Gemma3TextConfig

    def g(key: str, default: Any = None) -> Any:
        return meta.get(f"gemma3.{key}", default)

    head_dim = int(g("attention.key_length", 256))
    global_theta = float(g("rope.freq_base", 1_000_000.0))
    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=int(g("embedding_length")),
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=int(g("attention.head_count")),
        num_key_value_heads=int(g("attention.head_count_kv")),
        head_dim=head_dim,
        max_position_embeddings=int(g("context_length", 32768)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        sliding_window=int(g("attention.sliding_window", 512)),
        # Gemma 3 below 27B scales queries by 1/sqrt(head_dim), as llama.cpp does.
        query_pre_attn_scalar=head_dim,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": global_theta},
            # Not in the GGUF: llama.cpp hard-codes Gemma 3's local base as well.
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", 2),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id", 1),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", 0),
        tie_word_embeddings=True,
    )


def _gemma3_state_dict(torch: Any, gguf: GgufFile) -> dict[str, Any]:
    sd: dict[str, Any] = {}
    for name in gguf.tensors:
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name.startswith("blk."):
            _, layer, part, _ = name.split(".")
            if part not in _LAYER_NAMES:
                raise EngineError(f"unexpected tensor {name}", engine="torch")
            key = f"model.layers.{layer}.{_LAYER_NAMES[part]}.weight"
        else:
            raise EngineError(f"unexpected tensor {name}", engine="torch")
        weights = _dequantize(torch, *gguf.raw(name))
        if name.endswith("norm.weight"):
            # llama.cpp's converter stores Gemma's RMSNorm scale as 1 + w; transformers adds the 1.
            weights = weights - 1.0
        sd[key] = weights
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def _build_model(torch: Any, config: Any, state_dict: dict[str, Any]) -> Any:
    from transformers import Gemma3ForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    # Random init of 270M parameters costs seconds and is overwritten at once.
    with no_init_weights():
        model = Gemma3ForCausalLM(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


# --- Tokenizer --------------------------------------------------------------------------


class SpmVocab:
    """llama.cpp's SentencePiece tokenizer ("llama" vocab type), from GGUF metadata."""

    def __init__(self, tokens: list[str], scores: Sequence[float], types: Sequence[int],
                 bos: int, eos: int, add_bos: bool, add_space_prefix: bool) -> None:  # fmt: skip
        self.tokens = tokens
        self.scores = [float(s) for s in scores]
        self.types = [int(t) for t in types]
        self.bos, self.eos = bos, eos
        self.add_bos, self.add_space_prefix = add_bos, add_space_prefix
        self.ids = {t: i for i, t in enumerate(tokens)}  # later duplicates win, as in llama.cpp
        self.eog_ids = frozenset({eos} | {i for i, t in enumerate(tokens) if t in EOG_TEXTS})
        specials = [i for i, ty in enumerate(self.types) if ty in (UNKNOWN, CONTROL, USER_DEFINED)]
        # llama.cpp splits on special tokens longest first (tokenizer_st_partition).
        specials.sort(key=lambda i: (-len(tokens[i]), i))
        self._specials = [(tokens[i], i) for i in specials if tokens[i]]
        self._byte_ids = [self.ids.get(f"<0x{b:02X}>", -1) for b in range(256)]
        self._pieces = [b"" if i in self.eog_ids else self._piece(i) for i in range(len(tokens))]

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> SpmVocab:
        """Read the vocabulary of a GGUF whose `tokenizer.ggml.model` is "llama"."""
        model = meta.get("tokenizer.ggml.model")
        if model != "llama":
            raise EngineError(f"torch engine supports SentencePiece vocabularies, not {model!r}",
                              engine="torch")  # fmt: skip
        return cls(
            list(meta["tokenizer.ggml.tokens"]),
            meta["tokenizer.ggml.scores"],
            meta["tokenizer.ggml.token_type"],
            bos=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
            eos=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        )

    def _piece(self, i: int) -> bytes:
        ty, text = self.types[i], self.tokens[i]
        if ty == NORMAL:
            return text.replace("\u2581", " ").encode()
        if ty == USER_DEFINED:
            return text.encode()
        if ty == BYTE:
            return bytes([int(text[3:5], 16)])
        if ty == UNKNOWN:
            return "\u2585".encode()
        return b""  # control and unused tokens are not rendered

    def decode(self, ids: Sequence[int]) -> bytes:
        """Concatenated token pieces."""
        pieces = self._pieces
        return b"".join(pieces[i] for i in ids)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Split on special tokens, then merge each stretch of text by piece score."""
        out = [self.bos] if add_bos and self.add_bos else []
        fragments: list[str | int] = [text]
        for special, sid in self._specials:
            if special not in text:
                continue
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or special not in frag:
                    split.append(frag)
                    continue
                parts = frag.split(special)
                for k, part in enumerate(parts):
                    if k:
                        split.append(sid)
                    if part:
                        split.append(part)
            fragments = split
        prev_special = True
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                frag = " " + frag
            self._encode_piece(frag.replace(" ", "\u2581"), out)
            prev_special = False
        return out

    def _encode_piece(self, text: str, out: list[int]) -> None:
        # llm_tokenizer_spm_session: merge the best-scoring adjacent pair until none is a token.
        symbols = list(text)
        n = len(symbols)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, str]] = []
        ids, scores = self.ids, self.scores

        def push(left: int, right: int) -> None:
            if left < 0 or right >= n:
                return
            merged = symbols[left] + symbols[right]
            tid = ids.get(merged)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, merged))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            # Stale entry: one side has changed since the pair was queued.
            if not symbols[left] or not symbols[right] or symbols[left] + symbols[right] != merged:
                continue
            if nxt[left] != right:
                continue
            symbols[left] = merged
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        i = 0
        while i < n:
            tid = ids.get(symbols[i])
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_ids[b] for b in symbols[i].encode())
            i = nxt[i]
