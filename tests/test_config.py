"""The published architectures, exactly: hyper-parameters, FFN widths, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import LlamaConfig, RopeScaling
from llama_jax.model.config import config_path, ffn_hidden_dim, load_config_file, model_config_from_file, presets
from llama_jax.model.model import abstract

# (preset, parameters, FFN width, head_dim, tied, rope factor) — llama-models `sku_list.py`; the rope
# factor from transformers' `convert_llama_weights_to_hf.py`
PUBLISHED = [
    ("llama3_1_8b", 8_030_261_248, 14_336, 128, False, 8.0),
    ("llama3_1_70b", 70_553_706_496, 28_672, 128, False, 8.0),
    ("llama3_1_405b", 405_853_388_800, 53_248, 128, False, 8.0),
    ("llama3_2_1b", 1_235_814_400, 8_192, 64, True, 32.0),
    ("llama3_2_3b", 3_212_749_824, 8_192, 128, True, 32.0),
    ("llama2_7b", 6_738_415_616, 11_008, 128, False, None),
]


@pytest.mark.parametrize("name, params, ffn, head_dim, tied, factor", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_config_files_give_published_architectures(name, params, ffn, head_dim, tied, factor):
    config = model_config_from_file(name)
    assert config.ffn_dim == ffn
    assert config.head_dim == head_dim
    assert config.tie_embeddings == tied
    assert (config.rope_scaling.factor if config.rope_scaling else None) == factor
    assert config.num_params() == params
    # the model built from it (abstractly: nothing is allocated) has exactly that many parameters
    state = nnx.state(abstract(config), nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) == params


def test_config_names_a_packaged_preset_or_any_py_file(tmp_path, monkeypatch):
    """`--config` resolves the same way for every command: a preset by name, else a path to one's own file."""
    assert {"llama3_1_8b", "llama3_1_405b", "tiny", "batch", "finetune_lora", "dpo", "rejection"} <= set(presets())
    assert config_path("llama3_1_8b").read_text().startswith('"""Llama 3.1 8B')
    own = tmp_path / "my_job.py"
    own.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'steps': 3})\n")
    assert load_config_file(own).steps == 3
    monkeypatch.chdir(tmp_path)
    assert load_config_file("my_job.py").steps == 3  # relative to the working directory, as a shell gives it
    assert model_config_from_file("tiny").n_layers == model_config_from_file(config_path("tiny")).n_layers
    with pytest.raises(FileNotFoundError, match="'llama3_1_9b' is neither a .py file nor a packaged preset; presets: "):
        config_path("llama3_1_9b")
    with pytest.raises(FileNotFoundError, match=r"configs/llama3_1_8b.py does not exist; the packaged preset is"):
        config_path("configs/llama3_1_8b.py")  # the path before presets moved into the package


def test_ffn_width_is_derived_as_meta_derives_it():
    assert ffn_hidden_dim(4096, 1.3, 1024) == 14336
    assert ffn_hidden_dim(16384, 1.2, 4096) == 53248
    assert ffn_hidden_dim(4096, None, 256) == 11008


def test_meta_params_json_and_hf_config_json_describe_the_same_model():
    from transformers import LlamaConfig as HFLlamaConfig

    meta = model_config_from_file("llama3_1_8b")
    hf = LlamaConfig.from_hf_config(HFLlamaConfig(**meta.to_hf_config()).to_dict())
    assert hf == meta


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match=r"params\.json: unknown field\(s\) \['n_experts'\]"):
        LlamaConfig.from_meta_params({"dim": 64, "n_layers": 2, "n_heads": 4, "n_experts": 8})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        LlamaConfig.from_hf_config(
            {
                "vocab_size": 8,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )


def test_invalid_head_counts_are_rejected():
    with pytest.raises(ValueError, match="multiple of n_kv_heads=3"):
        LlamaConfig(vocab_size=8, dim=64, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)


def _lowered_forward_size(n_layers: int) -> int:
    config = model_config_from_file("llama3_1_405b").replace(n_layers=n_layers)
    graphdef, state = nnx.split(abstract(config))  # shapes only: nothing is allocated
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    return len(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).as_text())


def test_compiled_program_does_not_grow_with_depth():
    """405B's 126 layers are one scanned block: its program is as large as a 2-layer model's."""
    assert abs(_lowered_forward_size(126) - _lowered_forward_size(2)) < 200  # the printed layer count


def test_rope_scaling_is_config():
    assert RopeScaling().factor == 8.0
    assert model_config_from_file("llama3_2_1b").rope_scaling == RopeScaling(factor=32.0)
