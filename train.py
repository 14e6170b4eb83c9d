"""Train an RPN and print its proposal recall.

  python train.py                                   # configs/default.py, ./workdirs/default
  python train.py --config configs/voc_vgg16.py --workdir /tmp/voc
  python train.py --config configs/default.py --config.num_train_steps=300
  python train.py --mode eval --workdir workdirs/default   # evaluate the latest checkpoint

The first run stores its config in <workdir>/config.json. Re-running with the same workdir
resumes from its latest checkpoint with that config (--config.<field>=... overrides a field
that may change on resume, e.g. num_train_steps to train on); a finished run prints its final
recall. A config that changes the model, anchors, targets, optimizer or data is refused unless
--restart starts over in the workdir. Multi-host: pass
--coordinator_address/--num_processes/--process_id, or let jax.distributed read the cluster
environment (TPU pods, SLURM) with --distributed.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (get_config()).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, logs, pictures. Default: workdirs/<config file name>."
)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval"], "Train (and resume) or only evaluate the latest checkpoint."
)
_RESTART = flags.DEFINE_bool(
    "restart",
    False,
    "Start over in --workdir: delete its checkpoints, metrics and pictures first (needed when "
    "the config changes fields that a resumed run cannot change).",
)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    None,
    "Split this host's CPU into this many JAX devices for data parallelism (faster on CPU; no "
    "effect on GPU/TPU devices). Default: the largest divisor of batch_size up to the core "
    "count. Not applied with --distributed or when XLA_FLAGS sets "
    "--xla_force_host_platform_device_count.",
    lower_bound=1,
)


def _run_config(workdir: str):
    """The config of this run: the one stored in ``workdir`` (``config.json``) when no
    ``--config`` file is given, with any ``--config.<field>`` overrides written over it; the
    ``--config`` file (default ``configs/default.py``) otherwise."""
    from jax_rpn import checkpoints

    stored = checkpoints.read_config(workdir) if os.path.isdir(workdir) else None
    config = checkpoints.config_of_run(stored, flags.FLAGS["config"])
    if config is stored:
        print(
            f"Using the config stored in {os.path.join(workdir, checkpoints.CONFIG_FILE)}",
            flush=True,
        )
    return config


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # absl and tfds notices; -v 0 (or more) shows them
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    config_name = os.path.splitext(os.path.basename(config_file))[0]
    workdir = _WORKDIR.value or os.path.join("workdirs", config_name)
    try:
        config = _run_config(workdir)
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    import jax

    from jax_rpn import parallel, training

    distributed = _DISTRIBUTED.value or _COORDINATOR.value
    if not distributed:
        parallel.split_cpu(config.batch_size, requested=_CPU_DEVICES.value)
    if distributed:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    logging.info(
        "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    try:  # a bad config, a changed config or missing data: one message, no traceback
        if _MODE.value == "eval":
            trainer = training.setup_evaluation(config, workdir)
        else:
            trainer, changes = training.setup_training(config, workdir, restart=_RESTART.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: {e}")
    if _MODE.value == "eval":
        trainer.evaluate_and_record()
        return
    try:
        trainer.train(restart=_RESTART.value, changes=changes)
    except FloatingPointError as e:
        sys.exit(f"train.py: {e}")


if __name__ == "__main__":
    from jax_rpn import host_memory

    host_memory.reexec_with_huge_pages()  # fewer page faults per step (see its docstring)
    app.run(main)
