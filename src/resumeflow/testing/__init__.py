"""Tools to prove that a pipeline resumes correctly: fakes, contract suites, a simulator.

What is here, and what each guarantees:

* ``FakeClock``: time moves only when told to; inject ``clock.monotonic``, ``clock.time`` and
  ``clock.sleep`` into ``TaskRunner`` or ``Runtime`` for runs that never wait.
* ``MemorySource``: in-memory partitions with ``int`` positions that can redeliver and
  reorder records like an at-least-once broker. ``MemorySink``: a two-phase sink (staged,
  idempotent finalize) that can fail its pre-commit or finalize. ``MemoryStore``: the
  ``Store`` contract exactly (epoch fencing, versioned state, staging), with failed and slow
  writes and torn commit records on demand.
* ``check_source(make_source)``, ``check_sink(make_sink)``, ``check_store(make_store)``:
  contract suites every backend must pass; each raises ``AssertionError`` saying which rule
  broke.
* ``simulate(build_flow, inputs, schedules=..., seed=...)``: runs seeded fault schedules
  (crashes at every crash point and in user code, failed, slow and torn store writes, sink
  failures, redelivered and reordered input, zombie owners on stale epochs), then a liveness
  phase without faults, and checks committed output and state against a fault-free run::

      from resumeflow import Flow
      from resumeflow.testing import simulate

      def build_flow(source, sink):
          flow = Flow("orders")
          (flow.source(source)
               .key_by(lambda e: e["customer"])
               .reduce(lambda total, e: total + e["amount"], initial=0)
               .sink(sink))
          return flow

      simulate(build_flow, {"0": [{"customer": "a", "amount": 3}, ...]}, schedules=2000)

  A failure raises ``AssertionError`` naming each violation by kind (``lost``,
  ``duplicated``, ``replay_above_bound``, ``non_monotonic_position``, ``stale_epoch_commit``,
  ``state_mismatch``, ...), the seed, and the call that replays it.

  With ``backend="sqlite"`` (or a ``SQLiteBackend``) the faulty runs use the real embedded
  backends instead: ``SQLiteStore`` in a temporary directory, one store object per simulated
  process (a crashed one is never reused; a zombie runs on its own object of the same file),
  with JSON-lines or SQLite-table sinks; torn records are made by editing the newest row of
  the store's ``commits`` table between runs. The checker reads the files, tables and store
  and compares them with the memory reference run.

From a shell: ``python -m resumeflow.testing run --schedules N --seed S`` checks the built-in
workloads, ``replay --seed N`` replays one schedule with a trace of every event, and ``soak``
runs a long campaign; ``--backend memory|sqlite|both`` picks the backends (``soak``: both),
``--jobs N`` the processes. Each prints schedules/s and the simulated/wall time ratio.
"""

from ._check import Outcome
from ._check_sink import SinkFixture, check_sink
from ._check_source import check_source
from ._check_store import check_store
from ._clock import FakeClock
from ._crash import SimulatedCrash
from ._observe import VIOLATION_KINDS, ObservedStore, Violation
from ._plan import FaultPlan
from ._sim import InjectedUserError, Schedule
from ._simulate import ScheduleResult, SimReport, run_schedule, simulate
from ._sink import MemorySink, SinkEntry
from ._source import MemorySource
from ._sqlite_sim import SQLiteBackend
from ._store import MemoryStore

__all__ = [
    "VIOLATION_KINDS",
    "FakeClock",
    "FaultPlan",
    "InjectedUserError",
    "MemorySink",
    "MemorySource",
    "MemoryStore",
    "ObservedStore",
    "Outcome",
    "SQLiteBackend",
    "Schedule",
    "ScheduleResult",
    "SimReport",
    "SimulatedCrash",
    "SinkEntry",
    "SinkFixture",
    "Violation",
    "check_sink",
    "check_source",
    "check_store",
    "run_schedule",
    "simulate",
]
