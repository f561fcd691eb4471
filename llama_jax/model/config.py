"""The model architecture: one frozen dataclass, built from Meta's `params.json`, HF's `config.json`,
or an ml-collections `get_config()` file: a preset of `llama_jax/configs/` by name, or any path.

Names follow Meta's (`dim`, `n_heads`, `n_kv_heads`, `rope_theta`, `norm_eps`) so this file reads
beside `llama_models/llama3/args.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from collections.abc import Mapping
from typing import Any

# Llama 3.x vocabulary: 128,000 BPE ranks + 256 special tokens.
LLAMA3_VOCAB_SIZE = 128_256
# Llama 2 (llama-2 `ModelArgs` defaults and its paper): θ 10,000 and a 4,096-token context.
LLAMA2_ROPE_THETA = 10_000.0
LLAMA2_CONTEXT = 4096


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's "llama3" rotary frequency scaling (Meta's `apply_scaling`, HF `rope_type="llama3"`).

    `factor` is 8 for Llama 3.1/3.3 and 32 for Llama 3.2 1B/3B (HF's value, from transformers'
    `convert_llama_weights_to_hf.py`; Meta's `apply_scaling` hard-codes 8, and Meta confirmed 32 for
    1B/3B in meta-llama/llama-models issues 166 and 241).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama decoder. Dimension letters used across the code base:

    B batch, T query positions, S key positions, D `dim`, F `ffn_dim`, N `n_heads`,
    K `n_kv_heads`, H `head_dim`, V `vocab_size`, L `n_layers`.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None  # None: dim // n_heads, as Meta derives it
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_seq_len: int = 131_072
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA groups)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def q_per_kv(self) -> int:
        """G: query heads sharing one KV head."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """Parameter count, computed from the shapes (tied embeddings counted once)."""
        d, h, f = self.dim, self.head_dim, self.ffn_dim
        attention = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        per_layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    # ---- constructors from the formats found in the wild -------------------------------------------

    @classmethod
    def from_meta_params(
        cls, params: Mapping[str, Any], *, source: str = "params.json", **overrides: Any
    ) -> LlamaConfig:
        """From Meta's `params.json` (the keys of `llama_models.llama3.args.ModelArgs`).

        Llama 1/2 files say `"vocab_size": -1` (the tokenizer decides) and carry no `rope_theta`:
        they get θ = 10,000, a 4,096-token context and no rope scaling, and their vocabulary must be
        given (`vocab_size=` override; the Meta reader passes the embedding's row count). Keys that
        contradict that reading (Llama 3.1 rope scaling beside a Llama 2 vocabulary marker) are an
        error naming the file and the key, never a guess.
        """
        known = {
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "multiple_of",
            "ffn_dim_multiplier",
            "norm_eps",
            "rope_theta",
            "use_scaled_rope",
            "max_seq_len",
            "max_batch_size",
            "rope_scaling_factor",
            "tie_embeddings",
            # Multimodal keys Meta ships but which do not change the text decoder:
            "vision_chunk_size",
            "vision_max_num_chunks",
            "vision_num_cross_attention_layers",
        }
        _reject_quantized_release(params, source)
        _reject_unknown(params, known, source)
        _require(params, ("dim", "n_layers", "n_heads"), source)
        llama2 = is_llama2_params(params, source)
        if llama2 and "vocab_size" not in overrides:
            raise ValueError(
                f"{source}: 'vocab_size' is -1 (Llama 1/2: the vocabulary comes from the tokenizer); load the "
                f"checkpoint directory (its embedding gives the size) or pass vocab_size="
            )
        n_heads = params["n_heads"]
        scaled = params.get("use_scaled_rope", False)
        fields: dict[str, Any] = dict(
            vocab_size=params.get("vocab_size", LLAMA3_VOCAB_SIZE),
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            ffn_dim=ffn_hidden_dim(params["dim"], params.get("ffn_dim_multiplier"), params.get("multiple_of", 256)),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", LLAMA2_ROPE_THETA if llama2 else 500_000.0),
            rope_scaling=RopeScaling(factor=params.get("rope_scaling_factor", 8.0)) if scaled else None,
            max_seq_len=params.get("max_seq_len", LLAMA2_CONTEXT if llama2 else 131_072 if scaled else 8192),
            tie_embeddings=params.get("tie_embeddings", False),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, source: str = "config.json") -> LlamaConfig:
        """From a Hugging Face `LlamaConfig` dict (`config.json`)."""
        if config.get("model_type", "llama") != "llama":
            raise ValueError(f"{source}: model_type={config.get('model_type')!r}, expected 'llama'")
        _require(
            config,
            ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
            source,
        )
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError(f"{source}: attention_bias/mlp_bias are not used by any Llama release")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={config['hidden_act']!r}, expected 'silu'")
        # transformers >= 5 nests rope settings under "rope_parameters"; older configs are flat.
        rope = dict(config.get("rope_parameters") or {})
        theta = rope.get("rope_theta", config.get("rope_theta", 10_000.0))
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        rope_scaling = None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (expected 'llama3')")
        if scaling is not None:
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        n_heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            ffn_dim=config["intermediate_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_seq_len=config.get("max_position_embeddings", 2048),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` transformers' `LlamaConfig` reads back into this architecture."""
        hf: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_embeddings,
        }
        if self.vocab_size == LLAMA3_VOCAB_SIZE:
            hf.update(bos_token_id=128_000, eos_token_id=[128_001, 128_008, 128_009])
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return hf

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], *, source: str = "config") -> LlamaConfig:
        """From our own field names (what `to_dict` and the `llama_jax/configs/*.py` files give)."""
        _reject_unknown(fields, {f.name for f in dataclasses.fields(cls)}, source)
        return cls(**fields)


def ffn_hidden_dim(dim: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """Meta's SwiGLU width (`FeedForward.__init__` with hidden_dim = 4 * dim), integer-exact."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def is_llama2_params(params: Mapping[str, Any], source: str = "params.json") -> bool:
    """A Llama 1/2 `params.json`: `vocab_size` -1 (a Llama 3 file states 128,256). Raises on contradictions."""
    vocab = params.get("vocab_size")
    if vocab is None and "rope_theta" not in params:
        raise ValueError(
            f"{source}: neither 'vocab_size' nor 'rope_theta' is given: cannot tell Llama 2 (vocab_size -1, "
            f"θ 10,000) from Llama 3 (vocab_size 128256, θ 500,000); add 'vocab_size'"
        )
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or (vocab <= 0 and vocab != -1)):
        raise ValueError(f"{source}: 'vocab_size' = {vocab!r}; expected a positive integer, or -1 (Llama 1/2)")
    if vocab != -1:
        return False
    for key in ("use_scaled_rope", "rope_scaling_factor"):
        if params.get(key):
            raise ValueError(
                f"{source}: 'vocab_size' -1 marks a Llama 1/2 params.json, but {key!r} = {params[key]!r} is Llama "
                f"3.1 rope scaling; ambiguous: give the real 'vocab_size' or drop {key!r}"
            )
    return True


# The presets shipped in the package: `get_config()` per model size and per job.
PRESETS_DIR = pathlib.Path(__file__).parents[1] / "configs"

# Meta's params.json of each published size (llama-models `sku_list.py`), the one table the model presets
# of `llama_jax/configs/` read (`model_preset`); the FFN width follows from `ffn_dim_multiplier` and
# `multiple_of` as Meta derives it.
_LLAMA3 = dict(
    vocab_size=LLAMA3_VOCAB_SIZE, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=131072
)
_LLAMA3_2 = dict(_LLAMA3, ffn_dim_multiplier=1.5, multiple_of=256, rope_scaling_factor=32.0, tie_embeddings=True)
_LLAMA2 = dict(
    vocab_size=32000, norm_eps=1e-05, rope_theta=LLAMA2_ROPE_THETA, use_scaled_rope=False, max_seq_len=LLAMA2_CONTEXT
)
_8B = dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024)
_1B = dict(_LLAMA3_2, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8)
MODEL_PARAMS: dict[str, dict[str, Any]] = {
    "llama3_1_8b": _8B,
    "llama3_1_70b": dict(_8B, dim=8192, n_layers=80, n_heads=64, multiple_of=4096),
    "llama3_1_405b": dict(_8B, dim=16384, n_layers=126, n_heads=128, ffn_dim_multiplier=1.2, multiple_of=4096),
    "llama3_2_1b": _1B,
    "llama3_2_3b": dict(_LLAMA3_2, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0),
    "llama_guard3_8b": dict(_8B, use_scaled_rope=False),  # Meta lists it without rope scaling
    "llama_guard3_1b": _1B,
    "llama2_7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256),
    "tiny": dict(_LLAMA3, vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32),
}


def model_preset(name: str):
    """The `get_config()` of model preset `name`: an ml-collections dict whose `model` is `MODEL_PARAMS[name]`."""
    import ml_collections

    return ml_collections.ConfigDict({"model": dict(MODEL_PARAMS[name])})


def presets() -> list[str]:
    """The names `--config` accepts besides a path: the modules of `llama_jax/configs/`."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.py") if p.stem != "__init__")


def config_path(config: str | pathlib.Path) -> pathlib.Path:
    """The file `--config` names: a packaged preset by name (`llama3_1_405b`, `finetune_lora`), or the path
    of any `get_config()` .py file (one's own)."""
    path = pathlib.Path(config)
    if path.suffix == ".py" or len(path.parts) > 1:
        if path.is_file():
            return path
        hint = f"; the packaged preset is --config {path.stem}" if path.stem in presets() else ""
        raise FileNotFoundError(f"config file {path} does not exist{hint}")
    if path.name in presets():
        return PRESETS_DIR / f"{path.name}.py"
    raise FileNotFoundError(
        f"config {str(config)!r} is neither a .py file nor a packaged preset; presets: {', '.join(presets())}"
    )


def is_llama2_config(config: LlamaConfig) -> bool:
    """What a Llama 1/2 `params.json` gives (θ 10,000, a 4,096 context, no rope scaling, untied): the
    Meta writer writes such a model in Meta's Llama 2 layout."""
    return (config.rope_theta, config.rope_scaling, config.max_seq_len, config.tie_embeddings) == (
        LLAMA2_ROPE_THETA,
        None,
        LLAMA2_CONTEXT,
        False,
    )


def _reject_quantized_release(params: Mapping[str, Any], source: str) -> None:
    """Llama 3.2's int4 releases (QLoRA, SpinQuant) say `quantization_args` (llama-models `QuantizationArgs`,
    `sku_list.llama3_2_quantized_models`); their shards hold int4/int8 weights and scales, which read
    as bf16 would be a silently wrong model."""
    args = params.get("quantization_args")
    if args is None:
        return
    raise ValueError(
        f"{source}: 'quantization_args' = {json.dumps(args)} marks a quantized Llama 3.2 release (QLoRA or "
        f"SpinQuant: int4 weights, int8 dynamic activations; its shards hold quantized tensors and scales), which "
        f"llama-jax does not load: use the bf16 release of the same model (e.g. Llama-3.2-1B-Instruct, not "
        f"Llama-3.2-1B-Instruct-QLORA_INT4_EO8 or -SpinQuant_INT4_EO8)"
    )


def load_config_file(config: str | pathlib.Path) -> Any:
    """The `get_config()` (an ml_collections ConfigDict) of a packaged preset or a .py file (`config_path`)."""
    path = config_path(config)
    spec = importlib.util.spec_from_file_location(f"_llama_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    return module.get_config()


def model_config_from_file(config: str | pathlib.Path) -> LlamaConfig:
    """The `LlamaConfig` of a preset or .py file (`config_path`): its `model` (or top-level) section."""
    cfg = load_config_file(config)
    section = cfg.model if "model" in cfg else cfg
    return config_from_spec(dict(section), source=str(config))


def config_from_spec(spec: Mapping[str, Any], *, source: str) -> LlamaConfig:
    """Either our field names, or Meta's params.json names (`multiple_of`, `ffn_dim_multiplier`...)."""
    spec = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}
    if "ffn_dim" in spec:
        return LlamaConfig.from_dict(spec, source=source)
    return LlamaConfig.from_meta_params(spec, source=source)


def read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _reject_unknown(fields: Mapping[str, Any], known: set[str], source: str) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")


def _require(fields: Mapping[str, Any], names: tuple[str, ...], source: str) -> None:
    missing = [n for n in names if n not in fields]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
