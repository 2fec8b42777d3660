"""Load a causal LM by short name, local folder, GGUF file or hub id.

The default models are converted once from GGUF into a local folder of safetensors
and tokenizer files under `$CACHETALK_HOME/models/NAME`, so later starts take seconds.
Every loaded model carries a fingerprint of its config and weights; KV caches and
bridges record it so that they are never applied to another model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cachetalk.server.fetch import DEFAULT_MODELS, cachetalk_home, fetch_gguf, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "cachetalk-model.json"
# Elements hashed per weight tensor: enough to tell checkpoints apart, cheap enough
# to run at every start of a model that was not converted by us.
FINGERPRINT_SAMPLE = 65536


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    source: str

    @property
    def config(self):
        return self.model.config.get_text_config(decoder=True)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def layer_kinds(self) -> list[str]:
        """Per layer, "sliding" or "full" attention."""
        types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers
        return ["sliding" if "sliding" in t else "full" for t in types]

    @property
    def sliding_window(self) -> int | None:
        return getattr(self.config, "sliding_window", None) if "sliding" in self.layer_kinds else None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return sorted({ids} if isinstance(ids, int) else set(ids or []))


def compute_fingerprint(model: PreTrainedModel) -> str:
    """Hash the architecture config and a strided sample of every weight tensor."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype",
                     "architectures", "_commit_hash", "use_cache"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())

    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // FINGERPRINT_SAMPLE)
        sample = flat[::stride].to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _load_gguf(path: Path, dtype: torch.dtype):
    logger.info("loading and dequantising %s (one-time conversion)", path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # save_pretrained refuses a model that still looks quantised.
    model.is_quantized = False
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    return model, tokenizer


def convert_gguf(path: Path, out: Path, name: str, chat_template: str | None = None,
                 extra_eos_tokens: tuple[str, ...] = (), dtype: torch.dtype = torch.float32) -> Path:
    """Convert a GGUF file into a folder of safetensors and tokenizer files."""
    started = time.perf_counter()
    model, tokenizer = _load_gguf(path, dtype)
    if chat_template is not None and tokenizer.chat_template is None:
        tokenizer.chat_template = chat_template
    if extra_eos_tokens:
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        eos += [tokenizer.convert_tokens_to_ids(t) for t in extra_eos_tokens]
        model.generation_config.eos_token_id = sorted(set(eos))

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    manifest = {"name": name, "source": str(path), "source_sha256": sha256_file(path),
                "fingerprint": compute_fingerprint(model)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))

    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    logger.info("converted %s into %s in %.1f s", path.name, out, time.perf_counter() - started)
    return out


def ensure_default_model(name: str) -> Path:
    """Return the converted folder of a default model, fetching and converting it once."""
    folder = cachetalk_home() / "models" / name
    if (folder / MANIFEST).exists():
        return folder
    spec = DEFAULT_MODELS[name]
    gguf = fetch_gguf(name)
    return convert_gguf(gguf, folder, name, spec.chat_template, spec.extra_eos_tokens)


def resolve_model(spec: str) -> tuple[str, Path | str]:
    """Map a model argument to (served name, folder or hub id); converts GGUF files once."""
    if spec in DEFAULT_MODELS:
        return spec, ensure_default_model(spec)

    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        name = path.stem.lower()
        key = f"{name}-{path.stat().st_size}-{int(path.stat().st_mtime)}"
        folder = cachetalk_home() / "models" / "gguf" / key
        if not (folder / MANIFEST).exists():
            convert_gguf(path, folder, name)
        return name, folder
    if path.is_dir():
        return path.resolve().name, path.resolve()
    if path.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {spec!r} not found: no such file or folder")
    return spec, spec  # a hub id, which from_pretrained resolves


def load_model(spec: str, name: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for inference on the CPU or a GPU.

    Example:
        >>> lm = load_model("smollm2-135m")
        >>> lm.num_layers, lm.num_kv_heads, lm.head_dim
        (30, 3, 64)
    """
    served_name, location = resolve_model(spec)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if torch.cuda.is_available():
        model.to("cuda")

    manifest = Path(location) / MANIFEST if isinstance(location, Path) else None
    if manifest is not None and manifest.exists():
        fingerprint = json.loads(manifest.read_text())["fingerprint"]
    else:
        fingerprint = compute_fingerprint(model)

    logger.info("loaded %s from %s in %.2f s (fingerprint %s)", served_name, location,
                time.perf_counter() - started, fingerprint)
    return LoadedModel(name or served_name, model, tokenizer, fingerprint, str(location))
