"""The paper's setting: Qwen2.5-Math-1.5B fine-tuned with Target-SFT on NuminaMath-CoT.

For a GPU or TPU mesh. Set the local paths (no hub downloads happen at run time):
  --config.model.path=/data/Qwen2.5-Math-1.5B        (a Hugging Face directory)
  --config.prior.path=/data/Qwen2.5-Math-7B          (the teacher: same tokenizer)
  --config.data.train_path=/data/numina_cot.jsonl    (NuminaMath-CoT: problem/solution/messages)
  --config.data.eval_path=/data/math500.jsonl        (held-out problems with an answer field)
Use --config.prior.source=initial for the frozen initial model as the prior instead of a teacher.
The paper's training hyperparameters are not recovered (PAPER.md): these are ordinary SFT values
for a 1.5B model; sweep eta.
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    'smollm2_demo', pathlib.Path(__file__).with_name('smollm2_demo.py'))
smollm2_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smollm2_demo)


def get_config():
  config = smollm2_demo.get_config()
  config.workdir = 'runs/qwen2p5_math_numina'
  config.hparams.eta = 0.5

  config.model.source = 'hf'
  config.model.path = '/data/Qwen2.5-Math-1.5B'
  config.model.compute_dtype = 'bfloat16'  # float32 master weights, bfloat16 matmuls
  config.model.remat = True  # per-layer rematerialization for 2k-token sequences

  config.prior.source = 'hf'
  config.prior.path = '/data/Qwen2.5-Math-7B'
  config.prior.param_dtype = 'bfloat16'  # frozen: no master copy needed
  config.prior.compute_dtype = 'bfloat16'

  config.data.kind = 'files'
  config.data.task = 'numina_math'
  config.data.train_path = '/data/numina_cot.jsonl'
  config.data.eval_path = '/data/math500.jsonl'
  config.data.seq_len = 2048
  config.data.truncate = True  # long solutions are cut (and counted) rather than stopping
  config.data.difficulty = {}

  config.steps = 2000
  config.batch_size = 64  # rows of 2048 tokens per step, across all devices
  config.accum_steps = 1
  config.optimizer.learning_rate = 1e-5
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.01

  config.mesh.update({'data': 1, 'fsdp': -1, 'tensor': 1})
  config.checkpoint.every = 200
  config.checkpoint.keep = 3

  config.eval.before = False  # evaluate the base model separately (it is the same every run)
  config.eval.num_problems = 500
  config.eval.max_new_tokens = 1024
  config.eval.batch_size = 64
  config.log_every = 10
  return config
