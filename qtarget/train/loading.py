"""The student and the prior, loaded (or randomly initialised) straight into their shards."""

import pathlib

import jax
from flax import nnx

from qtarget.models import llama
from qtarget.train import sharding as sharding_lib
from qtarget.train.errors import ConfigError


def model_overrides(model_config) -> dict:
  """The LlamaConfig fields a model or prior config sets (numerics, LoRA, remat, kernels)."""
  return dict(param_dtype=model_config.param_dtype, compute_dtype=model_config.compute_dtype,
              lora_rank=model_config.lora_rank, lora_alpha=model_config.lora_alpha,
              remat=model_config.remat, attention=model_config.get('attention', 'auto'),
              scan_layers=model_config.get('scan_layers', True))


def random_model(config: llama.LlamaConfig, seed: int, mesh=None, rules=None) -> llama.Llama:
  """A randomly initialised decoder; with a mesh, initialised under ``jit`` whose outputs are
  the parameters' shardings, so no device ever holds a whole tensor it does not own."""
  make = lambda: llama.Llama(config, rngs=nnx.Rngs(seed))
  if mesh is None:
    return make()
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = sharding_lib.state_shardings(abstract, mesh, dict(rules or {}))
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def load_model(model_config, *, seed: int, with_lora: bool = True, mesh=None, rules=None):
  """``(model, tokenizer)`` from a config's ``source``: 'gguf', 'hf' or 'random'.

  With ``mesh`` and ``rules`` every tensor goes straight to its shards (streamed one at a time
  from the checkpoint); without, the model is built on the default device.
  """
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  from qtarget import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  overrides = model_overrides(model_config)
  if not with_lora:
    overrides['lora_rank'] = 0
  placement = dict(mesh=mesh, rules=rules)
  source = model_config.source
  if source == 'gguf':
    return checkpoints.load_gguf(model_config.path or None, seed=seed, **placement, **overrides)
  if source == 'hf':
    model = checkpoints.load_hf(model_config.path, seed=seed, **placement, **overrides)
    tokenizer = tokenizer_lib.Tokenizer.from_directory(model_config.path)
    tokenizer.check_model_vocabulary(model.config.vocab_size)
    return model, tokenizer
  if source == 'random':
    # A random model of the given shape, with the tokenizer of `tokenizer_path` (a GGUF or HF
    # directory; empty: SmolLM2's).
    arch = dict(model_config.architecture)
    model = random_model(llama.LlamaConfig(**arch, **overrides), seed, mesh, rules)
    path = model_config.tokenizer_path
    if path and pathlib.Path(path).is_dir():
      tokenizer = tokenizer_lib.Tokenizer.from_directory(path)
    else:
      tokenizer = tokenizer_lib.Tokenizer.from_gguf(checkpoints.gguf_reader(path or None))
    tokenizer.check_model_vocabulary(model.config.vocab_size)
    return model, tokenizer
  raise ConfigError(f"model.source must be 'gguf', 'hf' or 'random', got {source!r}.")


def load_tokenizer(model_config):
  """The tokenizer ``load_model`` would return for ``model_config``, without the weights."""
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  from qtarget import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  source, path = model_config.source, model_config.path
  if source == 'hf':
    return tokenizer_lib.Tokenizer.from_directory(path)
  if source == 'random':
    path = model_config.tokenizer_path
    if path and pathlib.Path(path).is_dir():
      return tokenizer_lib.Tokenizer.from_directory(path)
  elif source != 'gguf':
    raise ConfigError(f"model.source must be 'gguf', 'hf' or 'random', got {source!r}.")
  return tokenizer_lib.Tokenizer.from_gguf(checkpoints.gguf_reader(path or None))


def check_same_vocabulary(student_tokenizer, prior_tokenizer):
  """The prior must share the student's tokenizer; embedding sizes may differ by padding rows
  (Qwen2.5 pads 1.5B and 7B differently), which the step cuts or pads with -inf."""
  student_vocab = student_tokenizer.backend.get_vocab()
  prior_vocab = prior_tokenizer.backend.get_vocab()
  if student_vocab != prior_vocab:
    differing = sorted(set(student_vocab.items()) ^ set(prior_vocab.items()))[:3]
    raise ConfigError(
        f"the prior's tokenizer ({len(prior_vocab)} tokens) differs from the student's "
        f'({len(student_vocab)} tokens), for example at {differing}: the prior must share the '
        "student's tokenizer and vocabulary.")
