"""Whether optional references are here: SmolLM2's GGUF is the tokenizer of the tiny configs."""

import importlib.util

import pytest


def smollm2_missing() -> str | None:
  """Why SmolLM2's GGUF cannot be read here, or None when it can."""
  if importlib.util.find_spec('gguf') is None:
    return 'needs the gguf package (the test extra)'
  try:
    from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
    checkpoints.smollm2_gguf_path()
  except (ModuleNotFoundError, FileNotFoundError) as missing:
    return str(missing)
  return None


def skip_module_without_smollm2() -> None:
  """Skips the calling test module (at import) when SmolLM2's GGUF is not available."""
  reason = smollm2_missing()
  if reason:
    pytest.skip(reason, allow_module_level=True)


def needs_smollm2(what_for: str):
  """A skip mark for tests that need SmolLM2's GGUF; ``what_for`` goes into the reason."""
  missing = smollm2_missing()
  return pytest.mark.skipif(missing is not None, reason=f'{what_for}: {missing}')
