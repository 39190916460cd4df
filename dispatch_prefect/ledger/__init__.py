"""The budget ledger: durable, exact, race-free reservations.

The ledger is where a cap becomes real. ``check`` reads the run window and
the month window and asks the policy rule ``admits``; ``reserve`` asks it
again inside one write transaction that locks the windows first, so any
number of processes together can never commit more than the cap.
``reconcile`` turns a reservation into spending at its actual cost,
``release`` gives back a job that never ran, and ``sweep`` settles
reservations whose end nobody saw, charging the full bound when the truth
cannot be found.

- Money is ``Decimal`` in and out: exact NUMERIC in PostgreSQL, exact
  decimal text in SQLite (``schema`` argues why).
- SQLite is the default, a file under ``PREFECT_HOME``, in WAL mode with
  ``synchronous=FULL``: a commit is on disk before the call returns.
  PostgreSQL (``postgresql://...``, driven by psycopg 3) is for teams with
  several orchestrating machines.
- Window totals are kept in rows beside the reservations and changed in the
  same transaction, so admission costs the same whatever the history.
- The schema is created on first use and versioned.
- A database that cannot be reached or stays locked raises
  ``LedgerUnavailable``: the gate refuses (fails closed).

```python
from decimal import Decimal
from dispatch_prefect.ledger import Ledger, ReservationKey
from dispatch_prefect.policy import BudgetCap

cap = BudgetCap(run_usd=Decimal("5"), month_usd=Decimal("100"))
ledger = Ledger.open()  # $PREFECT_HOME/dispatch_prefect/ledger.db
key = ReservationKey(root_run_id="run-1", task_run_id="task-1", attempt=1)
ledger.reserve(key, budget="default", bound_usd=Decimal("1.20"), cap=cap)
ledger.reconcile(key, Decimal("0.87"))
run_state, month_state = ledger.window_states("default", "run-1")
```
"""

from dispatch_prefect.ledger.errors import (
    BudgetExceeded,
    LedgerError,
    LedgerInputError,
    LedgerUnavailable,
    ReservationSettled,
    UnknownReservation,
)
from dispatch_prefect.ledger.records import (
    MonthTotal,
    Reservation,
    ReservationKey,
    ReservationRequest,
    ReservationStatus,
)
from dispatch_prefect.ledger.schema import SCHEMA_VERSION
from dispatch_prefect.ledger.store import Ledger

__all__ = [
    "SCHEMA_VERSION",
    "BudgetExceeded",
    "Ledger",
    "LedgerError",
    "LedgerInputError",
    "LedgerUnavailable",
    "MonthTotal",
    "Reservation",
    "ReservationKey",
    "ReservationRequest",
    "ReservationSettled",
    "ReservationStatus",
    "UnknownReservation",
]
