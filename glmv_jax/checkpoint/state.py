"""Orbax checkpoints of a training run: params, optimizer state, step, RNG key and the data iterator.

Layout (one orbax `CheckpointManager` under `WORKDIR/checkpoints`)::

    checkpoints/<step>/params/     the params pytree (PyTreeCheckpointHandler, OCDBT, sharded arrays)
    checkpoints/<step>/train/      {"step", "opt_state", "rng"}
    checkpoints/<step>/data/       the grain iterator state, one JSON file per process
                                   (grain.checkpoint.CheckpointHandler: `process_<i>-of-<n>.json`)
    checkpoints/<step>/loop/       the loop's own state as JSON, when it has one (RLCS: iteration and
                                   curriculum), an item of the same step so it cannot fall out of step

Saves are asynchronous: `save` returns once the arrays are copied off the devices and the iterator
state is written (the grain handler is synchronous, so the state is the one at the moment of the call;
the loop may then donate the state buffers and read on), and the files are written by a background
thread. `wait()` blocks until every save is on disk; `close()` waits too.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` (after
writing `commit_success.txt`) only when every item is complete, so a crash during a save leaves at most
an unfinished tmp folder, which `latest_step()` ignores and the next manager deletes
(`cleanup_tmp_directories`); the previous checkpoint stays usable. Keep-last-K deletes older steps only
after a newer one is finalised.

The workdir may be a URL (gs://...): paths go through `etils.epath`, as orbax's do.

Restoring onto another mesh: `restore` takes the abstract state (`jax.ShapeDtypeStruct`s with the new
`sharding=`), and orbax reads every array straight into that sharding.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from glmv_jax.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "train", "data", "loop")


class CheckpointMismatch(CheckpointError):
    """A checkpoint whose trees or shapes do not match what this run restores into."""


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """WORKDIR/checkpoints; a local workdir is made absolute, a URL stays a URL."""
    path = epath.Path(workdir)
    return (path if "://" in str(path) else path.resolve()) / CHECKPOINT_DIR


# Arrays whose per-replica slice is smaller than this are written whole by replica 0 instead of split across
# their replicas: splitting costs an eagerly compiled slice per shape (seconds on the first save of a model
# with many small parameters) and gains nothing for small arrays. Large arrays keep replica-parallel writes.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 16 << 20


def _array_registry():
    return ocp.type_handlers.create_type_handler_registry(
        (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)))


def _handlers() -> dict[str, Any]:
    from grain.checkpoint import CheckpointHandler as GrainHandler

    registry = _array_registry()
    return {"params": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
            "train": ocp.PyTreeCheckpointHandler(type_handler_registry=registry), "data": GrainHandler(),
            "loop": ocp.JsonCheckpointHandler()}


def _save_args(tree):
    return ocp.args.PyTreeSave(tree)


def _restore_args(abstract):
    """Read every array into the sharding (and dtype) of its `jax.ShapeDtypeStruct`."""
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class TrainCheckpointer:
    """Save/restore the train state {"step", "params", "opt_state", "rng"} and a grain iterator.

    Args:
      workdir: the run folder; checkpoints go to `workdir/checkpoints`.
      keep: keep the last `keep` checkpoints.
      async_save: write in a background thread (`save` returns after the device-to-host copy).
      read_only: open another run's checkpoints (e.g. `init_from`) without creating or cleaning anything.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no checkpoints folder")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only, create=not read_only,
            read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    # ------------------------------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        """The newest finalised step (unfinished tmp folders of a crashed save are not steps)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ------------------------------------------------------------------------------------------- saving
    def save(self, step: int, state: dict, data_iterator=None, *, loop_state: dict | None = None) -> None:
        """Start saving `state` (keys step, params, opt_state, rng), the iterator's state and `loop_state` (a
        JSON-able dict: the loop's own state, e.g. RLCS's iteration and curriculum) as `step`, all in one
        orbax step (finalised together or not at all)."""
        from grain.checkpoint import CheckpointSave

        items = {"params": _save_args(state["params"]),
                 "train": _save_args({k: state[k] for k in ("step", "opt_state", "rng")})}
        if data_iterator is not None:
            items["data"] = CheckpointSave(data_iterator)
        if loop_state is not None:
            items["loop"] = ocp.args.JsonSave(loop_state)
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Block until every started save is on disk (raises if a background save failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- restoring
    def restore(self, abstract_state: dict, data_iterator=None, step: int | None = None) -> dict:
        """The state saved at `step` (default: the latest) placed as `abstract_state`'s shardings say.

        `abstract_state`: {"step", "params", "opt_state", "rng"} of `jax.ShapeDtypeStruct`s with `sharding=`
        (the mesh may differ from the one that saved). `data_iterator` (a grain DatasetIterator of the same
        pipeline) is set to the saved position in place. The loop state saved with the step, if any, comes back
        under "loop".
        """
        step = self._step(step)
        self._check(step, "params", abstract_state["params"])
        train_target = {k: abstract_state[k] for k in ("step", "opt_state", "rng")}
        self._check(step, "train", train_target)
        items = {"params": _restore_args(abstract_state["params"]), "train": _restore_args(train_target)}
        if data_iterator is not None:
            from grain.checkpoint import CheckpointRestore

            if not (self.directory / str(step) / "data").is_dir():
                raise CheckpointMismatch(f"{self.directory / str(step)} holds no data iterator state")
            items["data"] = CheckpointRestore(data_iterator)
        if self._has_item(step, "loop"):
            items["loop"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        loop = {"loop": restored["loop"]} if "loop" in items else {}
        return {"params": restored["params"], **restored["train"], **loop}

    def restore_loop_state(self, step: int | None = None) -> dict | None:
        """Only the loop state saved with `step` (default: the latest); None if that step has none."""
        step = self._step(step)
        if not self._has_item(step, "loop"):
            return None
        return self._manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"]

    def _has_item(self, step: int, item: str) -> bool:
        return (self.directory / str(step) / item).is_dir()

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the params of `step` (default: the latest), e.g. to start another run from them."""
        step = self._step(step)
        self._check(step, "params", abstract_params)
        restored = self._manager.restore(step, args=ocp.args.Composite(params=_restore_args(abstract_params)))
        return restored["params"]

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no finished checkpoint")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint of step {step}; steps: {self.all_steps()}")
        return step

    def _check(self, step: int, item: str, target) -> None:
        """Compare the saved tree (paths and shapes) with `target` before reading any array."""
        metadata = self._manager.item_metadata(step)[item]
        if metadata is None:
            raise CheckpointMismatch(f"{self.directory / str(step)} has no {item!r} item")
        problems = tree_problems(metadata, target)
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
            hint = (" (did the model or optimizer config change since it was saved?)" if item != "data" else "")
            raise CheckpointMismatch(f"checkpoint {self.directory / str(step)}/{item} does not match this run{hint}: "
                                     f"{shown}")


def tree_problems(saved, wanted) -> list[str]:
    """Differences between a saved tree (arrays or orbax metadata) and a target tree: missing and unexpected
    leaves, and leaves whose shapes differ, each named by its path ("decoder/layers/q/kernel")."""
    saved, wanted = _shapes(saved), _shapes(wanted)
    problems = [f"missing {k}" for k in sorted(wanted.keys() - saved.keys())]
    problems += [f"unexpected {k}" for k in sorted(saved.keys() - wanted.keys())]
    problems += [f"{k} has shape {saved[k]}, expected {wanted[k]}" for k in sorted(wanted.keys() & saved.keys())
                 if saved[k] != wanted[k]]
    return problems


def _shapes(tree) -> dict[str, tuple]:
    """{"a/b/c": shape} of every array (or array metadata) leaf; empty nodes and None are skipped."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    for path, leaf in leaves:
        if leaf is None or not hasattr(leaf, "shape"):
            continue
        out["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)] = \
            tuple(leaf.shape)
    return out


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    """True when `workdir/checkpoints` holds a finalised step."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        return False
    return any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


__all__ = ["CHECKPOINT_DIR", "CheckpointMismatch", "TrainCheckpointer", "checkpoint_dir", "has_checkpoint"]
