"""`python -m benchmarks.figures` draws each benchmark's headline from its results JSON, and the README's
"Measured" table links only results and figures that exist."""

import json
import pathlib
import re

from benchmarks import figures

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def measured_table() -> str:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Measured\n" in readme, "README.md has no '## Measured' section"
    return readme.split("\n## Measured\n", 1)[1].split("\n## ", 1)[0]


def test_every_committed_result_draws_its_png(tmp_path, capsys):
    present = {name for name, (source, _, _) in figures.DRAWINGS.items() if (figures.RESULTS / source).exists()}
    assert {"decode_cpu", "long_context_cpu", "engine_cpu", "batch_cpu", "train_cpu"} <= present
    written = figures.draw_all(figures.RESULTS, tmp_path)
    assert {p.stem for p in written} == present
    for path in written:
        assert path.read_bytes().startswith(PNG_MAGIC), path
    out = capsys.readouterr().out
    for name in set(figures.DRAWINGS) - present:
        assert f"skipped {name}:" in out


def test_a_missing_result_is_skipped_with_a_note(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "train_cpu.json").write_text((figures.RESULTS / "train_cpu.json").read_text())
    written = figures.draw_all(results, tmp_path / "out")
    assert [p.name for p in written] == ["train_cpu.png"]
    out = capsys.readouterr().out
    assert "skipped decode_cpu:" in out and "decode_cpu.json does not exist yet" in out


def test_compiled_targets_draws_efficiencies_and_failures(tmp_path):
    entry = {"target": "h100x1", "program": "decode", "batch": 1, "efficiency": 0.88}
    results = tmp_path / "results"
    results.mkdir()
    (results / "compiled_targets.json").write_text(
        json.dumps({"8b/bf16/h100x1/decode/1/8k": entry, "8b/bf16/v5e-1/decode/8/128k": {"error": "RuntimeError: OOM"}})
    )
    [path] = figures.draw_all(results, tmp_path / "out")
    assert path.name == "compiled_targets.png" and path.read_bytes().startswith(PNG_MAGIC)


def test_the_committed_figures_are_drawn_from_the_committed_results():
    for name, (source, _, _) in figures.DRAWINGS.items():
        if (figures.RESULTS / source).exists():
            assert (figures.FIGURES / f"{name}.png").exists(), f"run `python -m benchmarks.figures` ({name})"


def test_every_measured_row_links_its_results_json_and_figure():
    rows = [line for line in measured_table().splitlines() if line.startswith("|") and "---" not in line][1:]
    assert rows, "the Measured table has no rows"
    for row in rows:
        links = re.findall(r"\]\(([^)]+)\)", row)
        assert any(link.startswith("benchmarks/results/") and link.endswith(".json") for link in links), row
        assert any(link.startswith("docs/figures/") and link.endswith(".png") for link in links), row
        for link in links:
            assert (ROOT / link).exists(), f"README.md Measured table links {link}, which does not exist"
