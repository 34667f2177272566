"""The notebooks run top to bottom on CPU (their cells assert the results they show)."""

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'


@pytest.mark.parametrize('name', ['induced_targets.ipynb'])
def test_notebook_runs(name, tmp_path):
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the failing cell, on any error
  errors = [output for cell in notebook.cells for output in cell.get('outputs', [])
            if output.get('output_type') == 'error']
  assert not errors
