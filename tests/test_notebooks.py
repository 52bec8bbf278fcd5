"""The notebooks run top to bottom offline: the walkthrough on a tiny quickstart-shaped run, the
sweep analysis on a tiny offline sweep (CI's clean clone has no quickstart outputs)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebooks]'")
pytest.importorskip("ipykernel", reason="pip install -e '.[notebooks]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute(name: str) -> "nbformat.NotebookNode":
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return notebook


def outputs(notebook) -> list[dict]:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def text_of(notebook) -> str:
    parts = []
    for o in outputs(notebook):
        parts.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def images(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(notebook))


def test_there_are_the_two_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart_walkthrough.ipynb", "sweep_analysis.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_valid_and_have_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_walkthrough_runs_on_a_quickstart_shaped_run(tiny_quickstart, monkeypatch):
    monkeypatch.setenv("RLHF_RUNS_DIR", str(tiny_quickstart["runs"]))
    monkeypatch.setenv("RLHF_OUTPUTS_DIR", str(tiny_quickstart["outputs"]))
    notebook = execute("quickstart_walkthrough.ipynb")
    text = text_of(notebook)
    assert str(tiny_quickstart["runs"] / "ppo") in text  # it read the run given, not the default
    assert "held-out accuracy" in text and "val/reward/mean" in text
    assert "before PPO (iteration 0)" in text and "after PPO (iteration 2)" in text
    assert images(notebook) == 2  # the RM panels and the PPO reward/KL panels


def test_sweep_analysis_runs_on_an_offline_sweep(tiny_sweep, monkeypatch):
    monkeypatch.setenv("RLHF_SWEEP_DIR", str(tiny_sweep["out"]))
    notebook = execute("sweep_analysis.ipynb")
    text = text_of(notebook)
    assert "grid search, 2 trials, minimize val/loss" in text
    best = min(tiny_sweep["trials"], key=lambda t: t.metric)
    assert f"best trial {best.index}:" in text
    assert images(notebook) == 2  # metric vs hyperparameters, learning curves
