"""The notebooks run top to bottom on CPU (their cells assert the results they show)."""

import pathlib

import nbclient
import nbformat
import pytest

import xla_flags

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'


@pytest.mark.parametrize('name', [
    'induced_targets.ipynb',
    pytest.param('finetune_smollm2.ipynb', marks=pytest.mark.slow)])  # trains SmolLM2: minutes
def test_notebook_runs(name, tmp_path, monkeypatch):
  # The fine-tuning notebook trains the tiny random model here (SmolLM2 on Colab).
  monkeypatch.setenv('QTARGET_NOTEBOOK_CONFIG', 'tiny')
  monkeypatch.setenv('QTARGET_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('XLA_FLAGS', xla_flags.with_devices())  # one CPU device, as on a laptop
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOKS)}})
  client.execute()  # raises CellExecutionError, with the failing cell, on any error
  errors = [output for cell in notebook.cells for output in cell.get('outputs', [])
            if output.get('output_type') == 'error']
  assert not errors
