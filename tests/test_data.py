"""Records, tfds builders and the grain pipeline."""

import json
import tempfile

import numpy as np
import pytest

from qtarget import checkpoints
from qtarget import evaluate
from qtarget.data import builders
from qtarget.data import pipeline
from qtarget.data import records

import availability

needs_tokenizer = availability.needs_smollm2('needs the SmolLM2 GGUF tokenizer')


@pytest.fixture(scope='module')
def tokenizer():
  from qtarget import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.Tokenizer.from_gguf(checkpoints.gguf_reader())


def _write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  return path


# Records.

def test_prompt_response_and_messages_layouts(tmp_path):
  rows = [
      {'prompt': 'What is 2+2?', 'response': 'It is 4. #### 4'},
      # NuminaMath-CoT: problem, solution with a boxed answer, and the same as messages.
      {'problem': 'Find x if x+1=3.', 'solution': 'Subtract 1: $x = \\boxed{2}$.',
       'messages': [{'role': 'user', 'content': 'Find x if x+1=3.'},
                    {'role': 'assistant', 'content': 'Subtract 1: $x = \\boxed{2}$.'}]},
      # OpenR1: messages with a system turn and an answer field.
      {'answer': '\\frac{1}{2}', 'messages': [
          {'role': 'system', 'content': 'Think step by step.'},
          {'role': 'user', 'content': 'Half of one?'},
          {'role': 'assistant', 'content': 'One over two: \\boxed{\\frac{1}{2}}'}]},
  ]
  got = list(records.file_records(_write_jsonl(tmp_path / 'd.jsonl', rows)))
  assert [r['answer'] for r in got] == ['4', '2', '\\frac{1}{2}']
  assert got[1]['prompt'] == 'Find x if x+1=3.'
  assert got[2]['response'] == 'One over two: \\boxed{\\frac{1}{2}}'
  assert json.loads(got[2]['metadata'])['system'] == 'Think step by step.'


def test_parquet_file(tmp_path):
  pa = pytest.importorskip('pyarrow')
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pa.table({'question': ['1+1?', '2+3?'], 'response': ['2', '5']})
  pq.write_table(table, tmp_path / 'd.parquet')
  got = list(records.file_records(tmp_path / 'd.parquet'))
  assert [(r['prompt'], r['answer']) for r in got] == [('1+1?', ''), ('2+3?', '')]


@pytest.mark.parametrize('content, message', [
    ('', 'is empty'),
    ('{"prompt": "a", "response": "b"}\n{not json\n', r'd.jsonl:2: not valid JSON'),
    ('{"prompt": "a"}\n', r'd.jsonl:1: record without a response'),
    ('{"response": "b"}\n', r'd.jsonl:1: no prompt'),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', 'no assistant turn'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n',
     r"d.jsonl:1: \"messages\" holds the turns \['user', 'assistant', 'user', 'assistant'\]"),
    ('{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}\n',
     r"holds the turns \['assistant', 'user'\]"),
])
def test_bad_files(tmp_path, content, message):
  (tmp_path / 'd.jsonl').write_text(content)
  with pytest.raises(records.RecordError, match=message):
    list(records.file_records(tmp_path / 'd.jsonl'))


def test_missing_and_unsupported_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    list(records.file_records(tmp_path / 'nope.jsonl'))
  (tmp_path / 'd.csv').write_text('a,b\n')
  with pytest.raises(records.RecordError, match="unsupported file type '.csv'"):
    list(records.file_records(tmp_path / 'd.csv'))


@pytest.mark.parametrize('output, gold, expected', [
    ('so the total is 12.\n#### 12', '12', '12'),
    ('x = \\boxed{\\frac{1}{2}} done', '1/2', '\\frac{1}{2}'),
    ('The answer is 1,234 apples', '1234', '1234'),
    ('I think -7', '-7', '-7'),
    ('Paris', 'Paris', 'Paris'),
])
def test_extract_answer(output, gold, expected):
  assert records.extract_answer(output, gold) == expected


def test_scoring_uses_reasoning_gym_scorer():
  record = next(records.reasoning_gym_records('chain_sum', 1, seed=3))
  assert evaluate.score(record, record['answer']) == 1.0
  assert evaluate.score(record, str(int(record['answer']) + 1)) < 1.0
  file_record = {'task': 'file', 'answer': '1,000', 'metadata': '{}'}
  assert evaluate.score(file_record, '1000') == 1.0


# Builders.

def test_reasoning_gym_builder_splits_are_disjoint(tmp_path):
  config = builders.ReasoningGymConfig(task='chain_sum', train_size=300, eval_size=40, seed=1,
                                       difficulty={'min_terms': 2, 'max_terms': 2,
                                                   'min_digits': 1, 'max_digits': 1})
  builder = builders.prepare(config, str(tmp_path))
  splits = {s: builders.load_split(builder, s) for s in ('train', 'validation', 'test')}
  assert len(splits['test']) == len(splits['validation']) == 40
  train_prompts = {r['prompt'] for r in splits['train']}
  held_out = {r['prompt'] for r in splits['test'] + splits['validation']}
  assert not train_prompts & held_out
  # Validation is not test shifted (builder 1.0.0 drew it one seed below test) nor a copy of it.
  assert not {r['prompt'] for r in splits['validation']} & {r['prompt'] for r in splits['test']}
  assert 0 < len(splits['train']) < 300  # held-out questions were removed from train
  again = builders.load_split(builders.prepare(config, str(tmp_path)), 'test')
  assert again == splits['test']


def test_a_task_too_small_for_a_validation_split_apart_from_test_is_refused(tmp_path):
  # Products of two 1-digit factors: 100 questions, nearly all of them in a 400-problem test.
  config = builders.ReasoningGymConfig(task='products', train_size=50, eval_size=400, seed=0,
                                       difficulty={'min_terms': 2, 'max_terms': 2,
                                                   'min_digits': 1, 'max_digits': 1})
  with pytest.raises(ValueError, match=r'validation problems are not test questions; '
                                       r'eval_size=400 needs a task with more distinct'):
    builders.prepare(config, str(tmp_path))


def test_gsm_symbolic_has_rationales(tmp_path):
  config = builders.ReasoningGymConfig(task='gsm_symbolic', train_size=5, eval_size=2, seed=0)
  test = builders.load_split(builders.prepare(config, str(tmp_path)), 'test')
  assert all('####' in r['response'] and r['response'] != r['answer'] for r in test)


def test_local_files_builder(tmp_path):
  train = _write_jsonl(tmp_path / 'train.jsonl', [{'prompt': f'{i}+1?', 'response': str(i + 1)}
                                                  for i in range(10)])
  test = _write_jsonl(tmp_path / 'test.jsonl', [{'prompt': '5+5?', 'response': '10'}])
  config = builders.LocalFilesConfig(train_path=str(train), eval_path=str(test))
  builder = builders.prepare(config, str(tmp_path / 'tfds'))
  assert len(builders.load_split(builder, 'train')) == 10
  assert builders.load_split(builder, 'test')[0]['answer'] == ''
  with pytest.raises(FileNotFoundError, match='train data file .* does not exist'):
    builders.LocalFilesConfig(train_path=str(tmp_path / 'missing.jsonl'))


def test_preparing_leaves_no_temporary_directories(tmp_path, monkeypatch):
  # TFDS's bucket lookup for a dataset not yet prepared made an empty temporary directory per
  # builder; every training run and test left some in /tmp.
  temporary = tmp_path / 'tmp'
  temporary.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temporary))
  train = _write_jsonl(tmp_path / 'train.jsonl', [{'prompt': '1+1?', 'response': '2'}])
  config = builders.LocalFilesConfig(train_path=str(train), eval_path=str(train))
  for _ in range(2):  # the first prepares, the second reads the prepared dataset
    builder = builders.prepare(config, str(tmp_path / 'tfds'))
  assert builders.load_split(builder, 'train')[0]['response'] == '2'
  assert not list(temporary.iterdir())


# The pipeline.

@needs_tokenizer
def test_packed_batches(tmp_path, tokenizer):
  config = builders.ReasoningGymConfig(task='chain_sum', train_size=60, eval_size=4, seed=2)
  builder = builders.prepare(config, str(tmp_path))
  dataset = pipeline.train_dataset(builder, tokenizer, seq_len=256, batch_size=4, seed=0,
                                   num_epochs=None, pack=True, truncate=False)
  batch = next(iter(dataset))
  assert batch['tokens'].shape == (4, 256)
  assert batch['segment_ids'].max(axis=1).min() >= 2  # short problems pack several per row
  for row in range(4):
    segments = batch['segment_ids'][row]
    for segment in range(1, segments.max() + 1):
      where = segments == segment
      np.testing.assert_array_equal(batch['positions'][row][where], np.arange(where.sum()))
      # Targets are the next inputs within a segment.
      np.testing.assert_array_equal(batch['targets'][row][where][:-1],
                                    batch['tokens'][row][where][1:])
      # The loss covers the end of each segment only: the response after the prompt.
      mask = batch['loss_mask'][row][where]
      first = int(np.argmax(mask))
      assert mask[first:].all() and not mask[:first].any()
    assert not batch['loss_mask'][row][segments == 0].any()


@needs_tokenizer
@pytest.mark.parametrize('prefetch_batches', [0, 2])
def test_iterator_state_resumes_exactly(tmp_path, tokenizer, prefetch_batches):
  config = builders.ReasoningGymConfig(task='chain_sum', train_size=60, eval_size=4, seed=2)
  builder = builders.prepare(config, str(tmp_path))
  make = lambda prefetch=prefetch_batches: pipeline.train_dataset(
      builder, tokenizer, seq_len=128, batch_size=2, seed=5, num_epochs=None, pack=True,
      truncate=False, prefetch_batches=prefetch)
  # Prefetching changes where the work runs, not the stream.
  plain, ahead = iter(make(0)), iter(make(2))
  for _ in range(5):
    got, want = next(ahead), next(plain)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  iterator = iter(make())
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  resumed = iter(make())
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@needs_tokenizer
def test_host_shards_make_up_the_global_batch(tmp_path, tokenizer):
  config = builders.ReasoningGymConfig(task='chain_sum', train_size=60, eval_size=4, seed=2)
  builder = builders.prepare(config, str(tmp_path))
  kwargs = dict(seq_len=128, batch_size=4, seed=0, num_epochs=None, pack=True, truncate=False)
  whole = next(iter(pipeline.train_dataset(builder, tokenizer, **kwargs)))
  parts = [next(iter(pipeline.train_dataset(builder, tokenizer, process_index=i,
                                            process_count=2, **kwargs))) for i in range(2)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


@needs_tokenizer
def test_truncation_is_reported(tokenizer):
  recs = [{'prompt': 'hi', 'response': ' '.join(['many'] * 100), 'metadata': '{}'},
          {'prompt': 'hi', 'response': 'hello', 'metadata': '{}'}]
  report = pipeline.scan(recs, tokenizer, max_length=64, truncate=True, vocab_size=49152)
  assert report.truncated == 1 and report.examples == 2 and report.longest > 100
  arrays = pipeline.example_arrays(recs[0], tokenizer, 64, truncate=True)
  assert len(arrays['tokens']) == 64 and arrays['loss_mask'].any()
  # A prompt that alone fills the row leaves nothing to learn: named, not silently skipped.
  long_prompt = [{'prompt': ' '.join(['one'] * 100), 'response': 'x', 'metadata': '{}'}]
  with pytest.raises(pipeline.DataError, match='record 0 .*no response token is left'):
    pipeline.scan(long_prompt, tokenizer, max_length=64, truncate=True, vocab_size=49152)
