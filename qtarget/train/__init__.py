"""Training: one pure, sharded train step with the prior inside it, and the loop around it.

    python -m qtarget.train --config configs/smollm2_demo.py [--config.key=value ...]

Where to look:

=====================  ====================================================================
``step.py``            the pure step: student and prior forward, target, loss, update
``sharding.py``        the mesh, the rules (parameters and activations), the jitted step
``state.py``           the train state, the optimizer, initialisation into shards
``loading.py``         the student and the prior, loaded straight into their shards
``checks.py``          the config checked before anything loads; which fields define a run
``checkpointing.py``   checkpoints with the config, fallback, protected earlier results
``loop.py``            the loop in phases: set up or resume, steps, flush, evaluate, export
``workdir_lock.py``    one run per workdir: the lock, its holder, stale locks taken over
``metrics_log.py``     metrics.jsonl and TensorBoard scalars, rewound on resume
``__main__.py``        the command line
=====================  ====================================================================
"""

from qtarget.data.splits import dataset_builder, held_out_records
from qtarget.train.errors import ConfigError, DiskFull, WorkdirLocked
from qtarget.train.loading import check_same_vocabulary, load_model, model_overrides
from qtarget.train.loop import (TrainingDiverged, TrainingInterrupted,
                                maybe_initialize_distributed, run)
from qtarget.train.sharding import (MESH_AXES, Layout, batch_sharding, build_mesh, check_layout,
                                    config_rules, jit_train_step, logical_to_spec,
                                    state_shardings)
from qtarget.train.state import create_state, make_optimizer, place
from qtarget.train.step import (BATCH_KEYS, CACHED_PRIOR_KEYS, METRIC_SUMS, StepSpec,
                                TrainState, batch_keys, strided_micro_batches, student_model,
                                train_step)
