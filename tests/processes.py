"""How the tests start parties: real processes, forked from a server that has the heavy
modules imported already.

A party started with ``spawn`` is a fresh interpreter that imports torch and Lightning
again: about 3 s of CPU each on the 2-core machine, and most process tests start three
to sixteen of them. ``forkserver`` starts one server per test process that imports
them once (:data:`PRELOAD`), then forks each party from it: every party is still its
own process with its own interpreter state (the server runs no test code and no torch
operation), and starts in a fraction of a second. Parties that Lightning must start
again as scripts (DDP ranks) and the ``lightning-fed`` command-line tests still start
from scratch, as users' processes do.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

#: Imported once by the fork server (a module that fails to import is skipped).
PRELOAD = [
    "torch",
    "lightning.pytorch",
    "torchmetrics",
    "lightning_fed",
    "lightning_fed.fedavg",
    "lightning_fed.hetero",
    "lightning_fed.hetero.secure",
    "tests.fedavg.parties",
    "tests.hetero.parties",
    "tests.hetero.psi.parties",
    "tests.channel.workers",
]


def party_context() -> BaseContext:
    """The multiprocessing context that the tests start parties with."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


CTX = party_context()
