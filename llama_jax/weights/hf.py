"""Hugging Face checkpoints: `config.json` + `model.safetensors`, or sharded with an index."""

from __future__ import annotations

import pathlib

import numpy as np

from llama_jax.config import LlamaConfig, read_json
from llama_jax.weights.safetensors_io import DTYPES, SafetensorsFile

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_hf_checkpoint(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and ((path / SINGLE).exists() or (path / INDEX).exists())


class HFCheckpoint:
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
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        if (self.path / INDEX).exists():
            index = read_json(self.path / INDEX)
            if "weight_map" not in index:
                raise ValueError(f"{self.path / INDEX}: no 'weight_map'")
            missing = sorted({f for f in index["weight_map"].values() if not (self.path / f).is_file()})
            if missing:
                raise FileNotFoundError(
                    f"{self.path}: shard file(s) {missing} named in {INDEX} do not exist"
                )
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

    def fp8_layers(self) -> tuple[int, ...]:
        """Layers whose FFN weights are stored float8_e4m3fn (empty for an unquantized checkpoint)."""
        fp8 = np.dtype(DTYPES["F8_E4M3"])
        layers = []
        for i in range(self.config.n_layers):
            names = [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
            stored = [n in self._where and self.dtype(n) == fp8 for n in names]
            if any(stored) and not all(stored):
                raise ValueError(f"{self.path}: layer {i} has FP8 for only some of its FFN weights {names}")
            if all(stored):
                layers.append(i)
        return tuple(layers)
