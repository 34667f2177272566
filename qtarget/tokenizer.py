"""Tokenizers (the `tokenizers` package) with the model's chat template and response masks.

Built from a Hugging Face ``tokenizer.json`` (with ``tokenizer_config.json`` or
``chat_template.jinja`` for the template) or from a GGUF's embedded vocabulary and merges. The
chat template is the model's own Jinja template, rendered as transformers renders it; without
one, ChatML is used.
"""

import dataclasses
import datetime
import functools
import json
import os
import pathlib

import numpy as np

from qtarget import gguf_file

# ChatML, as SmolLM2 and Qwen use it, for tokenizers that come without a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_GGUF_CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens


@dataclasses.dataclass
class EncodedExample:
  """A tokenized (prompt, response) pair.

  Attributes:
    token_ids: prompt then response token ids (int32).
    loss_mask: True on the response tokens (including the end-of-turn token).
  """
  token_ids: np.ndarray
  loss_mask: np.ndarray


class Tokenizer:
  """A `tokenizers.Tokenizer` plus special ids and the chat template."""

  def __init__(self, backend, *, chat_template: str | None, bos_token: str | None,
               eos_token: str | None, pad_token: str | None = None):
    self.backend = backend
    self.chat_template = chat_template or CHATML_TEMPLATE
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token = pad_token or eos_token
    self.bos_id = self._id(bos_token)
    self.eos_id = self._id(eos_token)
    self.pad_id = self._id(self.pad_token)
    self._template = None

  def _id(self, token):
    return None if token is None else self.backend.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    """Number of token ids the tokenizer can produce (added tokens included)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def check_model_vocabulary(self, model_vocab_size: int) -> None:
    """Raises if the tokenizer produces ids the model cannot embed.

    A model's vocabulary may be larger (Qwen pads its embedding), never smaller.
    """
    if self.vocab_size > model_vocab_size:
      raise ValueError(f'the tokenizer has {self.vocab_size} tokens but the model embeds only '
                       f'{model_vocab_size}: they do not belong together.')

  # Construction.

  @classmethod
  def from_directory(cls, directory: str | os.PathLike) -> 'Tokenizer':
    """From a Hugging Face directory holding tokenizer.json (and tokenizer_config.json)."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    directory = pathlib.Path(directory)
    path = directory / 'tokenizer.json'
    if not path.exists():
      raise FileNotFoundError(f'no tokenizer.json in {directory}.')
    backend = tokenizers.Tokenizer.from_file(str(path))
    config_path = directory / 'tokenizer_config.json'
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    template = config.get('chat_template')
    if (directory / 'chat_template.jinja').exists():
      template = (directory / 'chat_template.jinja').read_text()
    token = lambda key: (config.get(key) or {}).get('content') if isinstance(
        config.get(key), dict) else config.get(key)
    return cls(backend, chat_template=template, bos_token=token('bos_token'),
               eos_token=token('eos_token'), pad_token=token('pad_token'))

  @classmethod
  def from_gguf(cls, reader) -> 'Tokenizer':
    """From a GGUF's ``tokenizer.ggml.*`` fields (a byte-level BPE, as SmolLM2 uses).

    ``reader``: a :class:`qtarget.gguf_file.GGUFFile` (``checkpoints.gguf_reader``) or a
    ``gguf.GGUFReader``.
    """
    import tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
    value = functools.partial(gguf_file.metadata_value, reader)
    if value('tokenizer.ggml.model') != 'gpt2':
      raise ValueError(f"GGUF tokenizer model {value('tokenizer.ggml.model')!r} is not "
                       "supported (only byte-level BPE, 'gpt2').")
    tokens = value('tokenizer.ggml.tokens')
    merges = [tuple(merge.split(' ', 1)) for merge in value('tokenizer.ggml.merges')]
    token_types = value('tokenizer.ggml.token_type', [1] * len(tokens))
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i, kind in enumerate(token_types) if kind == _GGUF_CONTROL_TOKEN]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in specials])
    name = lambda key: None if value(key) is None else tokens[int(value(key))]
    return cls(backend, chat_template=value('tokenizer.chat_template'),
               bos_token=name('tokenizer.ggml.bos_token_id'),
               eos_token=name('tokenizer.ggml.eos_token_id'),
               pad_token=name('tokenizer.ggml.padding_token_id'))

  def save(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.json and tokenizer_config.json (with the chat template)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(directory / 'tokenizer.json'))
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'chat_template': self.chat_template,
              'bos_token': self.bos_token, 'eos_token': self.eos_token,
              'pad_token': self.pad_token, 'add_bos_token': False, 'clean_up_tokenization_spaces': False}
    (directory / 'tokenizer_config.json').write_text(json.dumps(config, indent=2))

  # Text <-> ids.

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the model's chat template."""
    if self._template is None:
      from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top
      env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
      env.globals['raise_exception'] = _raise_template_error
      env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
      self._template = env.from_string(self.chat_template)
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                 bos_token=self.bos_token or '', eos_token=self.eos_token or '')

  def encode_prompt(self, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a user turn followed by the assistant's turn opening (for generation)."""
    return self.encode(self.render_chat(_messages(prompt, system), add_generation_prompt=True))

  def encode_example(self, prompt: str, response: str, system: str | None = None) -> EncodedExample:
    """Ids of the whole exchange and a loss mask that covers only the response.

    The prompt part is the template's text up to the assistant's turn opening; everything after
    it (the response and the end-of-turn tokens) is the response.
    """
    if not response:
      raise ValueError('encode_example: the response is empty.')
    prefix = self.render_chat(_messages(prompt, system), add_generation_prompt=True)
    full = self.render_chat(_messages(prompt, system) + [{'role': 'assistant', 'content': response}])
    if not full.startswith(prefix):
      raise ValueError('the chat template does not render the prompt as a prefix of the '
                       'whole exchange; cannot separate the response.')
    prompt_ids, response_ids = self.encode(prefix), self.encode(full[len(prefix):])
    ids = np.asarray(prompt_ids + response_ids, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    return EncodedExample(ids, mask)


def _messages(prompt: str, system: str | None) -> list[dict]:
  messages = [] if system is None else [{'role': 'system', 'content': system}]
  return messages + [{'role': 'user', 'content': prompt}]


def _raise_template_error(message):
  raise ValueError(f'chat template: {message}')
