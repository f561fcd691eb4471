"""The project's jitted programs, lowered for a named target on abstract weights (nothing is allocated).

    setup = Setup.create(config, targets.get("v5p-2"), weights="bf16")
    lowered = setup.decode_loop(batch=8, context=8192)      # `generate`'s decode loop
    compiled = lowered.compile()                             # the TPU compiler's program

The programs are the ones users run, called as their callers call them, not copies: the two programs
every caller runs, `decoding.prefill` and `decoding.decode`, over `generate`'s contiguous cache (with the
per-layer decode weights where `generate` would make them) and over the engine's page pool (its chunk
prefill and decode burst). Weights are the planner's abstract
sharded model (`placement.abstract_state`), on the target's devices; every other input is a
`ShapeDtypeStruct` placed where the program pins it (the cache) or replicated.
Traced under `platform.lowering_for(<target platform>)`, so attention "auto" picks what it picks there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.inference import decoding, sampler
from llama_jax.inference.decoding import DecodeState, Prompt, Rows
from llama_jax.inference.sampling import SamplingParams
from llama_jax.model import attention, paged_attention, platform, quant, unstacked
from llama_jax.model.config import LlamaConfig
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.options import Options
from llama_jax.model.paged_cache import PagedKVCache, pool_axes, pool_shape
from llama_jax.planning import targets
from llama_jax.planning.targets import Target
from llama_jax.weights import fp8, placement

# The engine's defaults (`Engine.__init__`): a program of the report is the one an `Engine()` compiles.
PAGE_SIZE, BLOCK_PAGES, BURST, PREFILL_CHUNK = 64, 4, 16, 256
WEIGHTS = ("bf16", "fp8")


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model (abstract, sharded) on a target's mesh, and what its programs need."""

    config: LlamaConfig
    target: Target
    weights: str  # "bf16" or "fp8" (the Llama 3.1 FP8 release layout)
    mesh: jax.sharding.Mesh
    spec: object  # the `ShardingSpec`
    graphdef: nnx.GraphDef
    state: nnx.State
    by_layer: bool  # the layers held `Unstacked`, as `load` holds them here (`unstacked.wanted`)

    @classmethod
    def create(
        cls,
        config: LlamaConfig,
        target: Target,
        weights: str = "bf16",
        mesh: dict | None = None,
        fp8_matmul: str = "fp8",
        by_layer: bool | None = None,
        training: bool = False,
    ) -> Setup:
        """`fp8_matmul`: how FP8 weights multiply (`quant.MODES`); "auto" is what a GPU with FP8 tensor cores
        runs. `by_layer`: hold the layers `Unstacked` (None: where `load` would, for this model here; a
        shallow stand-in for a deep model says what the deep one does). `mesh`: axis sizes (default: the
        target's mesh for inference, or for `training`: `Target.default_mesh`)."""
        if weights not in WEIGHTS:
            raise ValueError(f"weights {weights!r}: expected one of {WEIGHTS}")
        jax_mesh = target.mesh(mesh or target.default_mesh(config.n_heads, training))
        spec = placement.sharding_spec(jax_mesh, "fsdp_tp")
        layers = fp8.release_layers(config.n_layers) if weights == "fp8" else None
        options = Options(fp8=quant.Fp8Spec(layers, matmul=fp8_matmul) if layers else None, sharding=spec)
        graphdef, state = placement.abstract_state(config, options, jnp.bfloat16, by_layer, target.hbm_bytes)
        return cls(config, target, weights, jax_mesh, spec, graphdef, state, unstacked.held(state))

    # ---- inputs ---------------------------------------------------------------------------------

    def replicated(self, x) -> jax.ShapeDtypeStruct:
        """An input of `x`'s shape and dtype (an array or a ShapeDtypeStruct), replicated over the mesh."""
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(self.mesh, PartitionSpec()))

    def place(self, tree, cache_shape: tuple[int, ...] | None = None, axes: tuple[str, ...] = KVCache.axes):
        """Every leaf abstract and placed: cache-shaped leaves where the model pins the cache (by its
        logical `axes`), the rest replicated."""
        shardings = (
            {}
            if cache_shape is None
            else {
                cache_shape: self.spec.sharding(axes, cache_shape),
                cache_shape[1:]: self.spec.sharding(axes[1:], cache_shape[1:]),  # a layer's own buffer (`Unstacked`)
            }
        )

        def one(x):
            if tuple(x.shape) in shardings:
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[tuple(x.shape)])
            return self.replicated(x)

        return jax.tree.map(one, tree)

    @functools.cached_property
    def model(self):
        return nnx.merge(self.graphdef, self.state)

    def layer_weights(self, stacked: bool | None = None):
        """What `generate` and the engine decode with (`decoding.Weights.of`): per-layer weights where
        their copy takes at most `unstacked.COPY_BUDGET` of the device's HBM, else (or with `stacked`) None,
        the scanned stack; None too where the model holds its layers `Unstacked` (it runs them itself)."""
        if stacked is None:
            stacked = self.scans_layers()
        if stacked or self.by_layer:
            return None
        graphdef, leaves = self.graphdef, jax.tree.leaves(self.state)
        abstract = jax.eval_shape(lambda s: decoding.unstack(graphdef, s, fuse=False), self.state)
        # Which stacked weight each leaf of a layer's copy is: the same cut run on the weights' indices.
        indices = jax.tree.unflatten(
            jax.tree.structure(self.state), [np.full(x.shape[:1] or (1,), i) for i, x in enumerate(leaves)]
        )
        sources = decoding.unstack(graphdef, indices, fuse=False)

        def one(x, source):  # layer i of a stacked [L, ...] weight: its sharding without "layers"
            spec = leaves[int(source)].sharding.spec
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(self.mesh, PartitionSpec(*spec[1:])))

        return jax.tree.map(one, abstract, sources)

    def scans_layers(self) -> bool:
        """Whether `generate` and the engine decode this model on this target from the stacked weights
        (a layer scan: compile time flat in depth) rather than layer by layer (unrolled)."""
        return not self.by_layer and not unstacked.copy_fits(self.layer_bytes_per_device(), self.target.hbm_bytes)

    def layer_bytes_per_device(self) -> int:
        return max(unstacked.bytes_per_device(placement.layer_leaves(self.state)).values())

    # ---- what a decode step must read ------------------------------------------------------------

    def minimum_step_bytes(self, tokens_cached: int) -> int:
        """Bytes per device one decode step must read: every weight but the embedding table (a step
        gathers B rows of it) and the K/V of `tokens_cached` tokens (over the whole batch)."""
        read = [v.get_value() for path, v in nnx.to_flat_state(self.state) if path[0] != "tok_embeddings"]
        total = max(unstacked.bytes_per_device(jax.tree.leaves(read)).values())
        per_token = 2 * self.config.n_layers * self.config.n_kv_heads * self.config.head_dim * 2
        return total + tokens_cached * per_token // self.mesh.size

    # ---- the programs ---------------------------------------------------------------------------

    def _lower(self, jitted, *args, **static):
        with self.tracing():
            traced = jitted.trace(*args, **static)
        return traced.lower(lowering_platforms=(self.target.lowering_platform,))

    def tracing(self):
        return targets.tracing(self.target)

    def program_weights(self, stacked: bool | None = None) -> decoding.Weights:
        """What the programs compute with, as `decoding.Weights.of` makes it for this model on this target."""
        return decoding.Weights(self.state, self.layer_weights(stacked), self.graphdef)

    def _generate_state(self, weights: decoding.Weights, batch: int, prompt: int, context: int):
        """`generate`'s program state and prompt (`sampler.inputs`) for `weights`, abstract and placed."""
        params = SamplingParams(max_new_tokens=context - prompt)
        cache_shape = placement.cache_shape(self.config, batch, context)
        with self.tracing():  # one buffer per layer where `generate` makes it so here
            cache = placement.abstract_cache(
                self.config, batch, context, self.spec, by_layer=decoding.by_layer(weights)
            )
        stops = sampler.stop_ids(self.model, params.stop_tokens)[None]
        rows = Rows(np.zeros((batch,), np.uint32), np.arange(batch, dtype=np.int32), params.knobs(), stops)
        state = DecodeState.start(
            cache,
            rows,
            last=np.zeros(batch),
            positions=np.full(batch, prompt - 1),
            count=np.zeros(batch),
            limit=np.full(batch, context - prompt),
            live=np.ones(batch, bool),
            n_out=context - prompt,
            mode=params.mode,
        )
        tokens = Prompt(np.zeros((batch, prompt), np.int32), np.full((batch,), prompt - 1, np.int32))
        return self.place(state, cache_shape), self.place(tokens), cache_shape

    def prefill(self, batch: int, prompt: int, context: int):
        """`generate`'s prefill of `prompt` tokens per row (chunks of `DEFAULT_PREFILL_CHUNK`), `context` cache."""
        weights = self.program_weights()
        state, tokens, _ = self._generate_state(weights, batch, prompt, context)
        return self._lower(decoding.prefill, weights, state, tokens)

    def decode_loop(self, batch: int, context: int, stacked: bool | None = None):
        """`generate`'s decode loop (a `while_loop` of decode steps) over a `context`-entry cache; `stacked`:
        as `layer_weights` (None: as `generate` decides for this model on this target)."""
        weights = self.program_weights(stacked)
        state, tokens, cache_shape = self._generate_state(weights, batch, 16, context)
        with self.tracing():
            state = jax.eval_shape(decoding.prefill, weights, state, tokens)
        return self._lower(decoding.decode, weights, self.place(state, cache_shape), self.place(np.int32(context - 16)))

    def paged_attention(self, requested: str = "auto", slots: int = 8, context: int = 8192) -> str:
        """What an `Engine` of this model with `slots` slots of `context` tokens picks on this target
        (`attention.select_paged`)."""
        kernel_pool = pool_shape(self.config, slots * context // PAGE_SIZE + 1, PAGE_SIZE, paged_attention.KERNELS[0])
        with self.tracing():
            return attention.select_paged(
                requested,
                platform=platform.target(),
                dtype=jnp.bfloat16,
                head_dim=self.config.head_dim,
                page=PAGE_SIZE,
                block_pages=BLOCK_PAGES,
                split=paged_attention.pool_split(self.spec, self.config, slots, kernel_pool),
            )

    def _engine_state(self, slots: int, context: int, n_out: int, requested: str = "auto"):
        """The engine's program state (`Engine._state`) over a pool where `slots` slots hold `context` tokens,
        laid out for the paged attention an `Engine` with `requested` picks here."""
        n_pages = slots * context // PAGE_SIZE + 1  # every slot full, and the null page
        kernel = self.paged_attention(requested, slots, context)
        shape = pool_shape(self.config, n_pages, PAGE_SIZE, kernel)
        pool = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        table = np.zeros((slots, context // PAGE_SIZE), np.int32)
        params = SamplingParams(max_new_tokens=1)
        stops = np.stack([sampler.stop_ids(self.model, params.stop_tokens)] * slots)
        rows = Rows(
            np.zeros((slots,), np.uint32), np.zeros((slots,), np.int32), np.stack([params.knobs()] * slots), stops
        )
        zeros = np.zeros(slots)
        state = DecodeState.start(
            PagedKVCache(pool, pool, table, BLOCK_PAGES, kernel),
            rows,
            last=zeros,
            positions=zeros,
            count=zeros,
            limit=np.full(slots, n_out),
            live=np.ones(slots, bool),
            n_out=n_out,
            mode=params.mode,
        )
        return self.place(state, shape, pool_axes(kernel))

    def burst(self, slots: int, context: int, attention: str = "auto", stacked: bool | None = None):
        """The engine's decode burst (`BURST` steps) over `slots` slots whose pages hold `context` tokens each,
        with the paged attention an `Engine` loaded with `attention` runs here (`paged_attention`);
        `stacked` as `decode_loop`'s."""
        state = self._engine_state(slots, context, BURST, attention)
        return self._lower(decoding.decode, self.program_weights(stacked), state, self.place(np.int32(BURST)))

    def chunk_prefill(self, slots: int, context: int):
        """The engine's prefill call: `PREFILL_CHUNK` prompt tokens of `slots` rows into their pages."""
        state = self._engine_state(slots, context, 1)
        i32 = np.zeros((slots,), np.int32)
        tokens = self.place(Prompt(np.zeros((slots, PREFILL_CHUNK), np.int32), i32, i32))
        return self._lower(decoding.prefill, self.program_weights(), state, tokens)

    def train_step(self, batch: int, seq: int):
        """One `Trainer` step (full fine-tuning, float32 master weights and AdamW state, the default
        `TrainConfig`) on `batch` rows of `seq` tokens. The trainer is built inside `jax.eval_shape`,
        so no master copy of the weights is ever allocated."""
        from llama_jax.jobs.trainer import TrainConfig, Trainer

        built = {}

        def build(state):
            built["trainer"] = Trainer(nnx.merge(self.graphdef, state), TrainConfig(batch_size=batch))
            return built["trainer"].params, built["trainer"].opt_state, built["trainer"].frozen

        params, opt_state, frozen = jax.eval_shape(build, self.state)
        trainer = built["trainer"]
        param_shardings, opt_shardings = trainer.shardings

        def placed(tree, shardings):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

        trainer.params, trainer.opt_state = placed(params, param_shardings), placed(opt_state, opt_shardings)
        trainer.frozen = self.place(frozen)
        ints, floats = (jax.ShapeDtypeStruct((batch, seq), dtype) for dtype in (jnp.int32, jnp.float32))
        data = {"tokens": ints, "targets": ints, "loss_mask": floats, "positions": ints, "segment_ids": ints}
        with self.tracing():
            return trainer.lower_step(data, platforms=(self.target.lowering_platform,))
