"""What to sample and how: the settings of a request (`SamplingParams`) and the filters on logits.

    params = SamplingParams(max_new_tokens=64, temperature=0.6, top_p=0.9, seed=0)
    params = SamplingParams.meta(max_new_tokens=64)      # Meta's chat defaults, declared once below
    generate(model, prompts, params)                     # or generate(model, prompts, max_new_tokens=64, ...)

A `SamplingParams` validates itself when made, so every entry point (`generate`, `stream`, the CLI,
the batch job) rejects the same bad value with the same message. It splits in two for the jitted
programs: `mode` (static: which filters exist, greedy or not; a new mode is a new program) and
`knobs()` (traced: temperature, top-p, min-p; a new value reuses the program).

Sampling follows Meta's `generation.py`: temperature 0 is greedy argmax; otherwise
softmax(logits / temperature) restricted by top-k, then top-p (Meta's rule: keep tokens whose
*exclusive* prefix mass is <= p, so the top token always stays), then min-p (keep tokens with
p >= min_p * p_max). Each filter is a per-row threshold `[B, 1]`: a token is kept when its logit is
>= the threshold, and thresholds compose by `max`, so nothing scatters back through a sort. The
draw is an inverse CDF in two levels (`categorical`: one exp per entry, no random bits per entry),
much cheaper than the Gumbel trick over a 128K vocabulary on CPU; greedy is `argmax`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model.settings import setting

__all__ = [
    "CONSTRAINTS",
    "InvalidSampling",
    "LOGPROBS_MODES",
    "META_TEMPERATURE",
    "META_TOP_P",
    "Mode",
    "SamplingParams",
    "argmax",
    "categorical",
    "filter_logits",
    "min_p_threshold",
    "processed_logits",
    "sample",
    "top_k_threshold",
    "top_p_threshold",
]

# Meta's defaults for chat (llama-models `llama3/generation.py`, `chat_completion`).
META_TEMPERATURE = 0.6
META_TOP_P = 0.9


# What log-probs are of: "raw", the model's own distribution (log_softmax of its logits); "processed",
# the distribution the token is drawn from (temperature, then top-k, top-p, min-p; filtered tokens -inf).
# vLLM's `logprobs_mode` names the same two (raw_logprobs, processed_logprobs).
LOGPROBS_MODES = ("raw", "processed")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _is_seed(x) -> bool:
    return _is_int(x) and 0 <= x < 2**32


# field -> (valid?, what was expected). The vocabulary bounds of top_k and top_logprobs are checked
# against a model by `SamplingParams.check_vocab`; stop tokens (given or the model's default ones) by the sampler.
_RULES = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = score the prompt, sample nothing)"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    "seed": (
        lambda v: _is_seed(v) or (isinstance(v, tuple) and len(v) > 0 and all(map(_is_seed, v))),
        "an integer in [0, 2**32) or a list of them (one per prompt)",
    ),
    "stop_tokens": (lambda v: v is None or (isinstance(v, tuple) and all(map(_is_int, v))), "a list of token ids"),
    "logprobs": (lambda v: isinstance(v, bool), "true or false"),
    "top_logprobs": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "prompt_logprobs": (lambda v: isinstance(v, bool), "true or false"),
    "logprobs_mode": (lambda v: v in LOGPROBS_MODES, f"one of {', '.join(map(repr, LOGPROBS_MODES))}"),
    "json_schema": (lambda v: v is None or _is_json_object(v), "a JSON schema: an object, or its JSON text"),
    "regex": (lambda v: v is None or (isinstance(v, str) and v != ""), "a non-empty regular expression"),
    "choice": (
        lambda v: v is None or (isinstance(v, tuple) and len(v) > 0 and all(isinstance(c, str) and c for c in v)),
        "a non-empty list of non-empty strings",
    ),
}

# The output constraints (`llama_jax.inference.constrain`): a request sets at most one.
CONSTRAINTS = ("json_schema", "regex", "choice")


def _is_json_object(text) -> bool:
    try:
        return isinstance(text, str) and isinstance(json.loads(text), dict)
    except ValueError:
        return False


class InvalidSampling(ValueError):
    """A bad sampling setting; `field` names it (the batch job reports it per request line)."""

    def __init__(self, field: str, expected: str, value) -> None:
        super().__init__(f"{field}: expected {expected}, got {value!r}")
        self.field = field


def check_field(name: str, value) -> None:
    """Raise InvalidSampling("<name>: expected ..., got ...") unless `value` is valid for field `name`."""
    valid, expected = _RULES[name]
    if not valid(value):
        raise InvalidSampling(name, expected, value)


@dataclasses.dataclass(frozen=True)
class Mode:
    """The static (compile-time) shape of a sampling configuration; the values themselves are traced."""

    greedy: bool
    top_k: int  # 0: off
    top_p: bool
    min_p: bool
    logprobs: bool
    top_logprobs: int = 0  # K alternatives recorded per step (0: off)
    processed: bool = False  # log-probs of the processed distribution (`processed_logits`), not the raw one


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to continue a prompt. Immutable and checked when made (a ValueError names the field).

    Each field is declared once, here: its type, default, help, command-line flag and whether a batch
    request line may set it (`llama_jax.model.settings`); the commands and jobs that offer it name it with
    their own default (Meta's chat defaults for generate, chat and batch). The filters top_k, top_p,
    min_p apply in that order. A list of seeds gives each prompt its own: prompt i then samples exactly
    as it would alone with `seed=seed[i]`.
    """

    max_new_tokens: int = setting(
        help="new tokens per prompt at most (0: none, the prompt is only scored)", flag=True, request=True
    )
    temperature: float = setting(
        0.0, "0 = greedy (argmax), else sample softmax(logits / temperature)", flag=True, request=True
    )
    top_k: int = setting(0, "keep the k most likely tokens; 0 = off", flag=True, request=True)
    top_p: float = setting(
        1.0, "nucleus: keep a token when the mass above it is <= p (Meta's rule); 1 = off", flag=True, request=True
    )
    min_p: float = setting(0.0, "keep the tokens with p >= min_p * p_max; 0 = off", flag=True, request=True)
    seed: int | tuple[int, ...] = setting(0, "PRNG seed: the same seed and prompt give the same tokens", flag=True)
    stop_tokens: tuple[int, ...] | None = setting(
        None, "ids that end a row (not in the result); none: Llama 3's for a Llama 3 vocabulary; () = none"
    )
    logprobs: bool = setting(
        False, "also return each new token's float32 log-prob (see logprobs_mode)", flag=True, request=True
    )
    top_logprobs: int = setting(
        0, "K > 0: also record the K most likely ids per step and their log-probs", flag=True, request=True
    )
    prompt_logprobs: bool = setting(
        False,
        "also return each prompt token's log-prob given the tokens before it (vLLM's prompt_logprobs; the "
        "first token has none): with max_new_tokens=0, scoring a given text",
        flag=True,
        request=True,
    )
    logprobs_mode: str = setting(
        "raw",
        "raw: log-probs of the model's own distribution; processed: of the one sampling draws from "
        "(after temperature, top-k, top-p, min-p; a filtered token is -inf; greedy: raw)",
        flag=True,
        request=True,
    )
    json_schema: str | None = setting(
        None, "the output is JSON valid under this schema (an object, or its JSON text)", flag=True, request=True
    )
    regex: str | None = setting(None, "the output matches this regular expression, whole", flag=True, request=True)
    choice: tuple[str, ...] | None = setting(
        None, "the output is one of these strings (the flag: a,b,c)", flag=True, request=True
    )

    def __post_init__(self) -> None:
        # Lists become tuples, so params hash (they key compiled programs and batch groups).
        if isinstance(self.json_schema, dict):  # its text (params hash); keys keep their order: the output's
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        for name in ("seed", "stop_tokens", "choice"):
            value = getattr(self, name)
            if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
                object.__setattr__(self, name, tuple(int(v) if _is_int(v) else v for v in value))
        if isinstance(self.logprobs, np.bool_):
            object.__setattr__(self, "logprobs", bool(self.logprobs))
        for field in dataclasses.fields(self):
            check_field(field.name, getattr(self, field.name))
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidSampling(given[1], f"at most one of {', '.join(CONSTRAINTS)}", getattr(self, given[1]))

    @classmethod
    def meta(cls, **overrides) -> SamplingParams:
        """Meta's chat defaults (temperature 0.6, top-p 0.9), with `overrides` on top."""
        return cls(**{"temperature": META_TEMPERATURE, "top_p": META_TOP_P, **overrides})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def canonical(self) -> SamplingParams:
        """The same sampling with the settings greedy ignores reset, so equal programs compare equal."""
        if self.greedy:
            return dataclasses.replace(self, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
        return dataclasses.replace(
            self, temperature=float(self.temperature), top_p=float(self.top_p), min_p=float(self.min_p)
        )

    @property
    def constraint(self) -> tuple[str, str | tuple[str, ...]] | None:
        """(field, value) of the request's output constraint, None when unconstrained."""
        return next(((name, getattr(self, name)) for name in CONSTRAINTS if getattr(self, name) is not None), None)

    @property
    def mode(self) -> Mode:
        """The static half: which filters run (what the compiled program depends on)."""
        return Mode(
            greedy=self.greedy,
            top_k=0 if self.greedy else int(self.top_k),
            top_p=not self.greedy and self.top_p < 1.0,
            min_p=not self.greedy and self.min_p > 0.0,
            logprobs=self.logprobs,
            top_logprobs=int(self.top_logprobs),
            # Greedy decoding draws from no processed distribution (`processed_logits`): raw is what it has.
            processed=self.logprobs_mode == "processed"
            and not self.greedy
            and bool(self.logprobs or self.top_logprobs or self.prompt_logprobs),
        )

    def knobs(self) -> np.ndarray:
        """The traced half: float32 [temperature (1 when greedy), top_p, min_p]."""
        return np.asarray([self.temperature or 1.0, self.top_p, self.min_p], np.float32)

    def check_vocab(self, vocab_size: int) -> None:
        """The bounds that depend on the model: top_k and top_logprobs at most the vocabulary size."""
        for name in ("top_k", "top_logprobs"):
            if getattr(self, name) > vocab_size:
                expected = f"an integer in [0, {vocab_size}] (the vocabulary size)"
                raise InvalidSampling(name, expected, getattr(self, name))


# ---- filters: small pure functions on float32 logits [B, V] ---------------------------------------------


def top_k_threshold(logits_bv: jax.Array, k: int) -> jax.Array:
    """The k-th largest logit of each row (k static, >= 1)."""
    return jax.lax.top_k(logits_bv, k)[0][:, k - 1 :]


def top_p_threshold(logits_bv: jax.Array, p: jax.Array | float) -> jax.Array:
    """Meta's nucleus over softmax(logits): keep a token when the mass of the tokens above it is <= p.

    Meta sorts the vocabulary; a 128K-entry sort per row is slow on CPU, so instead this
    binary-searches the smallest probability q with mass(p_j > q) <= p over float32 bit patterns
    (monotone for non-negative floats): 31 masked sums, exact up to the rounding of those sums.
    """
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)
    bits_bv = jax.lax.bitcast_convert_type(probs_bv, jnp.int32)

    def halve(_, bounds):  # invariant: the answer lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        mass = jnp.sum(jnp.where(bits_bv > mid, probs_bv, 0.0), axis=-1, keepdims=True)
        fits = mass <= p
        return jnp.where(fits, lo, mid + 1), jnp.where(fits, mid, hi)

    lo = jnp.zeros((logits_bv.shape[0], 1), jnp.int32)
    hi = jnp.max(bits_bv, axis=-1, keepdims=True)  # mass above p_max is 0 <= p
    _, q_bits = jax.lax.fori_loop(0, 31, halve, (lo, hi))
    return jnp.min(jnp.where(bits_bv >= q_bits, logits_bv, jnp.inf), axis=-1, keepdims=True)


def min_p_threshold(logits_bv: jax.Array, min_p: jax.Array | float) -> jax.Array:
    """Keep p_i >= min_p * p_max, i.e. logit_i >= logit_max + log(min_p) (-inf keeps all at 0)."""
    return jnp.max(logits_bv, axis=-1, keepdims=True) + jnp.log(jnp.float32(min_p))


def _nucleus_threshold(sorted_bk: jax.Array, p) -> jax.Array:
    """Meta's rule on candidate logits sorted descending (the top k): cumulative sums, as Meta."""
    probs_bk = jax.nn.softmax(sorted_bk, axis=-1)
    exclusive_mass = jnp.cumsum(probs_bk, axis=-1) - probs_bk
    n_kept = jnp.sum(exclusive_mass <= p, axis=-1, keepdims=True)  # >= 1: the top token's mass before is 0
    return jnp.take_along_axis(sorted_bk, n_kept - 1, axis=-1)


def _knob(knobs: jax.Array, i: int) -> jax.Array:
    """Knob i: a scalar for one setting `knobs [3]`, a column `[B, 1]` for one per row `knobs [B, 3]`."""
    return knobs[i] if knobs.ndim == 1 else knobs[:, i : i + 1]


def apply_filters(scaled_bv: jax.Array, knobs: jax.Array, mode: Mode) -> jax.Array:
    """Tempered logits with every filtered-out token at -inf. knobs = [temperature, top_p, min_p], one
    setting `[3]` for every row or one per row `[B, 3]` (the same arithmetic either way)."""
    top_p, min_p = _knob(knobs, 1), _knob(knobs, 2)
    thresholds = []
    if mode.top_k:
        top_bk = jax.lax.top_k(scaled_bv, mode.top_k)[0]
        # top-p then runs on the top-k renormalised distribution (sorting k values, not V).
        thresholds.append(_nucleus_threshold(top_bk, top_p) if mode.top_p else top_bk[:, -1:])
    elif mode.top_p:
        thresholds.append(top_p_threshold(scaled_bv, top_p))
    if mode.min_p:
        thresholds.append(min_p_threshold(scaled_bv, min_p))
    if not thresholds:
        return scaled_bv
    threshold = functools.reduce(jnp.maximum, thresholds)
    return jnp.where(scaled_bv >= threshold, scaled_bv, -jnp.inf)


def processed_logits(logits_bv: jax.Array, knobs: jax.Array, mode: Mode) -> jax.Array:
    """The logits a token is drawn from: tempered, the filtered-out tokens at -inf (greedy: the logits
    themselves, whose argmax it takes); knobs `[3]` or per row `[B, 3]` (`apply_filters`)."""
    if mode.greedy:
        return logits_bv
    return apply_filters(logits_bv / _knob(knobs, 0), knobs, mode)


def sample_rows(keys_b: jax.Array, logits_bv: jax.Array, knobs: jax.Array, mode: Mode) -> jax.Array:
    """One token per row [B] int32, row b drawn with its own key `keys_b[b]` from `processed_logits`
    (greedy: argmax)."""
    if mode.greedy:
        return argmax(logits_bv)
    return categorical(keys_b, processed_logits(logits_bv, knobs, mode))


def argmax(logits_bv: jax.Array) -> jax.Array:
    """`jnp.argmax` over the last axis (the first index of the maximum), as two plain reductions: XLA's
    (value, index) reduction is several times slower on CPU over a 128K vocabulary."""
    v = logits_bv.shape[-1]
    top = jnp.max(logits_bv, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits_bv == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first, v - 1)  # a NaN row has no maximum


CDF_BLOCK = 512  # vocabulary entries per block of the two-level inverse CDF (~sqrt(128K))


def categorical(keys_b: jax.Array, logits_bv: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits_bv) (-inf: never drawn), row b with key `keys_b[b]`: [B] int32.

    By inverse CDF in two levels, as a CDF sampler such as `torch.multinomial` does in one: a block of
    `CDF_BLOCK` entries is drawn by its mass, then an entry within it by its weight, each with its own
    uniform (so float32's 2^-24 resolution applies to each level, not to 128K entries at once). One exp
    per entry and two small cumulative sums, against random bits and two logs per entry for the Gumbel
    trick (`jax.random.categorical`). The same distribution; not
    the same stream for a seed."""
    b, v = logits_bv.shape
    n = -(-v // CDF_BLOCK)
    weights = jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True))
    weights = jnp.pad(weights, ((0, 0), (0, n * CDF_BLOCK - v))).reshape(b, n, CDF_BLOCK)
    u_b2 = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys_b)
    block_b = _inverse_cdf(jnp.sum(weights, axis=-1), u_b2[:, 0])
    within = jnp.take_along_axis(weights, block_b[:, None, None], axis=1)[:, 0]
    return block_b * CDF_BLOCK + _inverse_cdf(within, u_b2[:, 1])


def _inverse_cdf(weights_bn: jax.Array, u_b: jax.Array) -> jax.Array:
    """Per row, the first index whose cumulative weight exceeds u x the total: index i with probability
    weight_i / total. A zero weight is never chosen (its cumulative sum equals its predecessor's), also
    when rounding puts u x total past the end (then: the last index of positive weight)."""
    n = weights_bn.shape[-1]
    cumulative = jnp.cumsum(weights_bn, axis=-1)
    index = jnp.sum(cumulative <= u_b[:, None] * cumulative[:, -1:], axis=-1, dtype=jnp.int32)
    last = jnp.max(jnp.where(weights_bn > 0, jnp.arange(n, dtype=jnp.int32), 0), axis=-1)
    return jnp.minimum(index, last)


def filter_logits(
    logits_bv: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> jax.Array:
    """logits / temperature with the tokens outside top-k / top-p / min-p set to -inf."""
    params = SamplingParams(max_new_tokens=1, temperature=temperature or 1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    logits_bv = jnp.asarray(logits_bv, jnp.float32)
    return apply_filters(logits_bv / jnp.float32(params.temperature), params.knobs(), params.mode)


def sample(
    key: jax.Array,
    logits_bv: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> jax.Array:
    """One token per row of `logits_bv` `[B, V]` → `[B]` int32 (temperature 0: argmax)."""
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits_bv = jnp.asarray(logits_bv, jnp.float32)
    keys_b = jax.random.split(key, logits_bv.shape[0])
    return sample_rows(keys_b, logits_bv, params.knobs(), params.mode)
