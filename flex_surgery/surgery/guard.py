"""What keeps a theater's modified weights from escaping: errors, the optimizer guard, and a
restore that Ctrl-C cannot cut in half.

While weights are modified, three things could make the modification permanent or leak it: an
``optimizer.step()`` training on them, a ``state_dict()`` checkpointing them
(:mod:`.checkpoint_guard`), and an interrupt landing in the middle of putting them back. The
training state a validation disturbs (flags, RNG, grads) is :mod:`.training_guard`'s.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from flex_surgery.surgery.checkpoint_guard import install_checkpoint_guard
from flex_surgery.surgery.shards import LocalShard
from flex_surgery.surgery.snapshot import Snapshot

__all__ = ["RestoreError", "SurgeryError", "install_guards", "interrupts_deferred"]


class SurgeryError(RuntimeError):
    """Misuse of a theater: re-entering, exiting out of order, stepping a modified parameter."""


class RestoreError(SurgeryError):
    """Putting the weights back failed part-way (e.g. a device error). The theater keeps every
    snapshot and stays active; :meth:`SurgicalTheater.restore` retries."""


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT while weights are being put back, then deliver it.

    A Ctrl-C in the middle of the restore loop would leave half the model modified; the restore
    is a sequence of memcpys, so delaying the interrupt by that long is harmless.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def install_guards(modules: Sequence[nn.Module], targets: Sequence[LocalShard],
                   snapshots: Sequence[Snapshot], handles: list[RemovableHandle]) -> None:
    """The optimizer guard (a global step pre-hook refusing to step a modified parameter) and
    the checkpoint guard. Each handle is appended to ``handles`` as soon as it exists, so a
    failure part-way leaves none bound that the caller cannot remove."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    modified = {id(o) for s in targets for o in s.owners}
    names = {id(o): s.name for s in targets for o in s.owners}

    def refuse_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in modified:
                    raise SurgeryError(
                        f"optimizer.step() inside an active SurgicalTheater would train "
                        f"modified weights ({names[id(p)]}); step after the context exits"
                    )

    if modified:
        handles.append(register_optimizer_step_pre_hook(refuse_step))
    if snapshots:
        handles.extend(install_checkpoint_guard(modules, targets, snapshots, SurgeryError))
