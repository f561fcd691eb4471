"""Hugging Face checkpoints: `config.json` + `model.safetensors`, or sharded with an index."""

from __future__ import annotations

import functools
import pathlib
import re

import numpy as np

from llama_jax.model.config import LlamaConfig, read_json
from llama_jax.weights import fp8, layout
from llama_jax.weights.safetensors_io import SafetensorsFile
from llama_jax.weights.source import SourceCheckpoint

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_hf_checkpoint(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and ((path / SINGLE).exists() or (path / INDEX).exists())


class HFCheckpoint(SourceCheckpoint):
    fmt = "hf"

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.hf_config = read_json(self.path / "config.json")
        self.config = LlamaConfig.from_hf_config(self.hf_config, source=str(self.path / "config.json"))
        quantization = self.hf_config.get("quantization_config")
        if quantization and quantization.get("quant_method") != "fbgemm_fp8":
            raise ValueError(
                f"{self.path / 'config.json'}: quantization {quantization.get('quant_method')!r} is not supported "
                f"(only the FP8 release's 'fbgemm_fp8')"
            )
        # A sequence classifier (reward models): `score.weight` [labels, D] in place of `lm_head`.
        self.score_labels: int | None = None
        if "LlamaForSequenceClassification" in (self.hf_config.get("architectures") or []):
            labels = self.hf_config.get("num_labels") or len(self.hf_config.get("id2label") or {}) or 2  # HF's default
            self.score_labels = int(labels)
        # FP8 405B release: rowwise float8_e4m3fn weights with a float32 `weight_scale` [out, 1].
        self.quantization: dict | None = quantization or None
        if self.quantization:
            self.activation_scale_ub = float(self.quantization.get("activation_scale_ub", self.activation_scale_ub))
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        if (self.path / INDEX).exists():
            index = read_json(self.path / INDEX)
            if "weight_map" not in index:
                raise ValueError(f"{self.path / INDEX}: no 'weight_map'")
            missing = sorted({f for f in index["weight_map"].values() if not (self.path / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{self.path}: shard file(s) {missing} named in {INDEX} do not exist")
            for name, file in index["weight_map"].items():
                if name not in self._file(file).names():
                    raise ValueError(f"{self.path / file}: tensor {name!r} listed in {INDEX} is not in the file")
                self._where[name] = file
        else:
            self._where = {name: SINGLE for name in self._file(SINGLE).names()}

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(self.path / file)
        return self._files[file]

    def names(self) -> set[str]:
        return set(self._where)

    def where(self, name: str) -> str:
        return str(self.path / self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self._where[name]).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(self._where[name]).dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self._file(self._where[name]).array(name)

    def release(self) -> None:
        """Drop every file's already-read pages from the resident set (see `SafetensorsFile.release`)."""
        for f in self._files.values():
            f.release()

    @functools.cached_property
    def fp8_layers(self) -> tuple[int, ...]:
        """Layers whose FFN weights are stored float8_e4m3fn (empty for an unquantized checkpoint)."""
        return self._fp8_layers_from_config() if self.quantization else ()

    def fp8_scale(self, param: layout.Path, layer: int) -> np.ndarray:
        """float32 [out]: the `weight_scale` (dequant multiplier per output row) of FFN weight `param`."""
        name = self.source_name(param, layer)[: -len("weight")] + "weight_scale"
        return np.asarray(self.read(name), np.float32).reshape(-1)

    def _fp8_layers_from_config(self) -> tuple[int, ...]:
        """`quantization_config.modules_to_not_convert` checked against the stored dtypes.

        transformers turns every `nn.Linear` not matched by the list into an `FbgemmFp8Linear`
        (`replace_with_fbgemm_fp8_linear`); with no list, everything but `lm_head` is converted. So a
        linear module is FP8 exactly when the list does not name it, and the stored dtypes must say
        the same. Only FFN weights may be FP8 (as in the 405B release): the model keeps attention
        and the head unquantized.
        """
        skip = self.quantization.get("modules_to_not_convert")
        skip = ["lm_head"] if skip is None else list(skip)
        where = f"{self.path / 'config.json'}: quantization_config.modules_to_not_convert"
        modules = [("lm_head", None)] if not self.config.tie_embeddings else []
        for i in range(self.config.n_layers):
            modules += [(f"model.layers.{i}.self_attn.{p}_proj", i) for p in "qkvo"]
            modules += [(f"model.layers.{i}.mlp.{fp8.HF_PROJECTIONS[w]}", i) for w in fp8.WEIGHTS]
        layers, problems = [], []
        for module, i in modules:
            name = module + ".weight"
            if name not in self._where:
                continue  # reported by `checkpoint.check`
            converted, stored = not skipped_module(module, skip), self.dtype(name) == fp8.DTYPE
            if converted != stored:
                says = "does not list" if converted else "lists"
                problems.append(f"{where} {says} {module!r}, but {name!r} in {self.where(name)} is {self.dtype(name)}")
            elif stored and ".mlp." not in module:
                problems.append(
                    f"{where} leaves {module!r} to be FP8: only FFN weights may be FP8 (the release "
                    f"keeps attention and lm_head bf16); add it to the list"
                )
            elif stored and module.endswith(fp8.HF_PROJECTIONS["w1"]):
                layers.append(i)
        for i in range(self.config.n_layers):
            names = [f"model.layers.{i}.mlp.{fp8.HF_PROJECTIONS[w]}.weight" for w in fp8.WEIGHTS]
            stored = [self.dtype(n) == fp8.DTYPE for n in names if n in self._where]
            if any(stored) and not all(stored):
                problems.append(f"layer {i} has FP8 for only some of its FFN weights")
        if problems:
            raise ValueError(
                f"{self.path}: FP8 checkpoint inconsistent with its config:\n  - " + "\n  - ".join(problems)
            )
        return tuple(layers)


def skipped_module(module: str, patterns: list[str]) -> bool:
    """transformers' `should_convert_module` (quantizers/quantizers_utils.py), negated: a pattern
    matches from the start up to a module boundary, as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in patterns)
