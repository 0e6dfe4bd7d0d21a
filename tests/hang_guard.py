"""How long a test waits for something before it calls it hung.

A guard against hangs, never a duration a test expects: the machines that run the suite are
small and shared (the demo's first Run took 147 s on a loaded one, issue 20), so it is far above
any loaded run. A test that must know that something happened waits for its sign (a Qt signal, a
file, an event, a process's exit), polling only to notice a child that died; it never sleeps a
fixed time instead.
"""

#: Seconds (subprocess and future timeouts, polling deadlines).
HANG_GUARD_S = 600
#: The same in milliseconds (pytest-qt's ``waitSignal`` / ``waitUntil``).
HANG_GUARD_MS = HANG_GUARD_S * 1000
