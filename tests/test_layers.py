"""The layers, and that imports point one way (docs/ARCHITECTURE.md, "Layers").

A module's layer is the subpackage of llama_jax/ it sits in; the layers, bottom to top:

    sharding/   meshes, rules, constraints, shard_map ops, jax.distributed    imports nothing else of llama_jax
    model/      the transformer and what it is made of (config, attention, caches, projections, settings)
    text/       tokenizers, Meta's chat format, tool calls
    weights/    a Llama's state: checkpoints read, written, placed on a mesh; FP8 and LoRA weights
    inference/  sampling, the two jitted programs, generate / stream, the engine
    jobs/       batch, rejection, Guard, convert, training
    configs/    the presets (a job's preset imports its job)
    planning/   the memory planner, targets, programs compiled for them
    cli, __main__ and the facade __init__: the only modules at the top

A module imports from its own layer or below. The import graph is read from the source (every
`import`, at module level or inside a function), so a lazy import cannot hide a dependency. And
`python -m llama_jax generate` is run to see what it really imports: never the training stack.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("llama_jax",)
GENERIC = "llama_jax.sharding"  # the generic layer: imports nothing else of llama_jax
LAYERS = ("sharding", "model", "text", "weights", "inference", "jobs", "configs", "planning")  # bottom to top
TOP = ("__init__", "__main__", "cli")  # the facade and the entry points, above every layer


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path, only: ast.AST | None = None) -> list[tuple[str, ast.AST]]:
    """Every (imported name, node) of a module (or of the one node `only`), relative imports resolved:
    `from a import b` gives a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in [only] if only is not None else ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [(f"{base}.{alias.name}", node) for alias in node.names]
    return out


def _owner(imported: str) -> str | None:
    """The package module an imported name lives in (a.b.c -> a.b when a.b.c is not a module), or None."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its source)."""
    graph = {}
    for name, path in MODULES.items():
        owners = {_owner(imported) for imported, _ in _imports(name, path)}
        graph[name] = {o for o in owners if o is not None and o != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                component.add(w)
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports():
    """The reader itself: `cli` imports each command's module only inside a function."""
    graph = import_graph()
    assert {"llama_jax.jobs.train", "llama_jax.jobs.batch", "llama_jax.planning.plan"} <= graph["llama_jax.cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def layer(module: str) -> int:
    """A module's layer, as its index in LAYERS (the top-level modules above them all)."""
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and MODULES[module].name != "__init__.py"):
        return len(LAYERS)
    return LAYERS.index(parts[1])


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every (module, module it imports) where the import points to a higher layer."""
    return sorted((m, d) for m, deps in graph.items() for d in deps if layer(d) > layer(m))


def test_every_module_sits_in_its_layers_folder():
    """llama_jax/ holds the layers' folders and, at the top, only the facade and the entry points."""
    package = ROOT / "llama_jax"
    assert sorted(p.stem for p in package.glob("*.py")) == sorted(TOP)
    assert sorted(p.name for p in package.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)
    # a layer's __init__ names the layer and imports nothing: importing one module loads no neighbour
    for name in LAYERS:
        init = package / name / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring naming its layer"
        assert _imports(f"llama_jax.{name}", init) == [], f"{init} imports"
    assert sorted(m for m in MODULES if layer(m) == len(LAYERS)) == ["llama_jax", "llama_jax.__main__", "llama_jax.cli"]


def test_imports_point_down_the_layers():
    graph = import_graph()
    assert upward(graph) == []
    # the reader itself: an upward import is seen (the model importing the sampler)
    assert upward({"llama_jax.model.model": {"llama_jax.inference.sampler", "llama_jax.model.rope"}}) == [
        ("llama_jax.model.model", "llama_jax.inference.sampler")
    ]
    # and nothing imports the facade: it only re-exports, lazily
    assert sorted(m for m, deps in graph.items() if "llama_jax" in deps) == []


def _generic(module: str) -> bool:
    return module == GENERIC or module.startswith(GENERIC + ".")


def test_sharding_imports_nothing_else_of_llama_jax():
    graph = import_graph()
    assert {"llama_jax.sharding.rules", "llama_jax.sharding.mesh"} <= set(graph)
    wrong = {m: sorted(d for d in deps if not _generic(d)) for m, deps in graph.items() if _generic(m)}
    assert {m: d for m, d in wrong.items() if d} == {}
    # and at run time: importing every module of llama_jax/sharding/ loads, besides them, only the
    # package's facade, which imports nothing until a name is asked for
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {sorted(m for m in MODULES if _generic(m))!r}:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "llama_jax" and not m.startswith("{GENERIC}")))
    """)
    assert _python(code).stdout.strip() == "['llama_jax']"


def test_importing_llama_jax_imports_nothing_until_a_name_is_used():
    code = textwrap.dedent("""
        import sys
        import llama_jax
        before = sorted(m for m in sys.modules if m.split(".")[0] in ("llama_jax", "jax", "flax"))
        llama_jax.generate, llama_jax.planning  # a name, and a layer's package
        print(before, "load" in dir(llama_jax), "llama_jax.inference.sampler" in sys.modules)
    """)
    assert _python(code).stdout.split() == ["['llama_jax']", "True", "True"]


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert found == [], "import cycle(s)"


# docs/ARCHITECTURE.md, "The path data takes": each path through the modules, every one importing the next.
DATA_PATHS = {
    "--temperature: the flag to the token it draws": ("cli", "sampler", "decoding", "sampling"),
    "a batch request: its JSONL line to its result": ("batch", "engine", "decoding", "generation"),
}


def _module(short: str) -> str:
    """The package module named `short`, whichever folder holds it (a preset of llama_jax/configs/ aside)."""
    (name,) = [m for m in MODULES if m.rpartition(".")[2] == short and ".configs" not in m]
    return name


def test_each_documented_data_path_is_one_chain_of_imports():
    graph = import_graph()
    architecture = " ".join((ROOT / "docs" / "ARCHITECTURE.md").read_text().split())  # lines joined
    for path, chain in DATA_PATHS.items():
        assert " ─► ".join(f"`{m}`" for m in chain) in architecture, path
        modules = [_module(m) for m in chain]
        for a, b in itertools.pairwise(modules):
            assert b in graph[a], f"{path}: {a} does not import {b}"

    # where the two paths meet: one token picker (called by decoding alone), one result builder, and no
    # sideways step from the engine into generate's module
    def calling(text: str) -> set[str]:
        return {m.rpartition(".")[2] for m, file in MODULES.items() if text in file.read_text()}

    assert calling("sample_rows(") == {"sampling", "decoding"}
    assert calling("GenerationResult(") == {"generation"}
    assert _module("sampler") not in graph[_module("engine")]


def _module_aliases(name: str, path: pathlib.Path) -> dict[str, str]:
    """Local names bound to package modules: `from llama_jax.weights import loading`,
    `import llama_jax.sharding.rules as r`."""
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            for (imported, _), alias in zip(_imports(name, path, node), node.names, strict=True):
                if imported in MODULES:
                    aliases[alias.asname or alias.name] = imported
    return aliases


def test_no_module_reaches_into_another_modules_private_names():
    reached = set()
    for name, path in MODULES.items():
        for imported, _ in _imports(name, path):
            owner = _owner(imported)
            if owner not in (None, name) and imported != owner and imported.rpartition(".")[2].startswith("_"):
                reached.add((name, imported))  # from x import _y
        aliases = _module_aliases(name, path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                owner = aliases[node.value.id]
                if owner != name and node.attr.startswith("_") and not node.attr.startswith("__"):
                    reached.add((name, f"{owner}.{node.attr}"))  # x._y
    assert reached == set()


def _training_stack() -> set[str]:
    """The trainer, its data and losses (every package module that imports optax), and Orbax checkpointing."""
    uses_optax = {m for m, p in MODULES.items() if any(i.split(".")[0] == "optax" for i, _ in _imports(m, p))}
    return {"llama_jax.jobs.train", "llama_jax.jobs.dpo", "llama_jax.jobs.data", "orbax.checkpoint"} | uses_optax


def test_generate_never_imports_the_training_stack(tmp_path):
    """`python -m llama_jax generate` on the embedded model, one token: what it imported, read at exit.

    optax itself is imported by `flax.nnx` (its `nnx.Optimizer`), so no NNX program avoids it; what
    generate must not add is any optax module beyond those, or any of the training stack.
    """
    code = textwrap.dedent("""
        import atexit, json, runpy, sys
        atexit.register(lambda: print("MODULES", json.dumps(sorted(sys.modules)), file=sys.stderr))
        sys.argv = ["llama_jax", "generate", "--prompt", "Hi", "--max-new-tokens", "1", "--temperature", "0"]
        runpy.run_module("llama_jax", run_name="__main__")
    """)
    proc = _python(code, check=False, JAX_COMPILATION_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = set(json.loads(proc.stderr.rpartition("MODULES ")[2]))
    assert {
        "llama_jax.inference.sampler",
        "llama_jax.jobs.jobs",
        "llama_jax.weights.default_model",
    } <= imported  # it did generate
    flax_nnx = set(json.loads(_python("import json, sys, flax.nnx; print(json.dumps(sorted(sys.modules)))").stdout))
    optax = {m for m in imported if m.split(".")[0] == "optax"}
    assert sorted(optax - flax_nnx) == []
    training = _training_stack()
    assert sorted(m for m in imported if m in training or m.startswith("orbax.checkpoint.")) == []


def _python(code: str, check: bool = True, **environ: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(environ)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=check
    )
