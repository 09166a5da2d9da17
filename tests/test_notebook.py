"""The tour notebook runs top to bottom without errors and ends with the graph picture."""

from __future__ import annotations

from pathlib import Path

import ipykernel  # noqa: F401  (the notebook's kernel: a missing one must fail, not skip)
import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "tour.ipynb"


def test_tour_notebook_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # One thread in the kernel: the cells are tiny and the CPU may be shared.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is ipykernel's own kernel spec, installed in sys.prefix with the package; jupyter_client
    # starts it with this interpreter, so a fresh venv needs no `ipykernel install`.
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert not errors
    last = code_cells[-1].outputs
    pngs = [o["data"]["image/png"] for o in last if "image/png" in o.get("data", {})]
    assert len(pngs) == 1 and len(pngs[0]) > 1000  # base64 of a real picture, not an empty one
