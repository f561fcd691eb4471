"""Every notebook in notebooks/ is committed clean and linked from the README.

Running them is a separate command, `python -m pytest -q --nbmake notebooks`: nbmake executes every
cell top to bottom, and a failing cell (the notebooks assert what they show) fails the run.
"""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Notebooks\n" in readme, "README.md has no '## Notebooks' section"
    return readme.split("\n## Notebooks\n", 1)[1].split("\n## ", 1)[0]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_outputs_cleared_and_the_python3_kernel(path):
    notebook = json.loads(path.read_text())
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            where = f"{path.name}, code cell {i}"
            assert cell["outputs"] == [], f"{where}: outputs committed; clear them (Jupyter: Clear All Outputs)"
            assert cell["execution_count"] is None, f"{where}: execution count committed; clear it"
    kernel = notebook["metadata"].get("kernelspec", {}).get("name")
    assert kernel == "python3", f"{path.name}: kernelspec {kernel!r}, expected python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_linked_from_the_readme_with_a_description(path):
    link = f"](notebooks/{path.name})"
    lines = [line for line in readme_section().splitlines() if link in line]
    assert len(lines) == 1, f"README.md '## Notebooks' should link notebooks/{path.name} on one line"
    description = lines[0].split(link, 1)[1].strip(" -—:")
    assert len(description.split()) >= 4, f"README.md: say what {path.name} shows, in a line"


def test_the_readme_links_only_notebooks_that_exist():
    linked = re.findall(r"\]\(notebooks/([^)]+\.ipynb)\)", readme_section())
    assert linked, "README.md '## Notebooks' links no notebook"
    missing = sorted(set(linked) - {p.name for p in NOTEBOOKS})
    assert not missing, f"README.md links notebooks that do not exist: {missing}"
