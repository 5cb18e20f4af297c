"""``lago-org-billing demo`` (and ``demo --serve``) stopped by SIGTERM before it serves: while its traffic runs, its
report is written or its servers stop.

* SIGTERM was handled only once ``--serve`` had printed its curl commands. A ``docker stop`` (systemd, ``kill``) sent
  in the demo's first seconds, while its traffic ran, ended the process at once by the signal (exit 143, its servers
  unstopped), and a container's PID 1, for which a signal without a handler is ignored, went on to serve until
  ``docker stop`` killed it after its 10 s grace. SIGTERM is now a Ctrl-C from the start: exit 130 before the
  serving, as ``demo --help`` says, with nothing on stderr.
* A SIGTERM while the servers stop is held until they have, as a Ctrl-C is (the app flushes its events first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from lago_org_billing import _demo

#: The directory this package is imported from, first on the child's path (the tests run from a directory of their
#: own: a relative PYTHONPATH there would have the child import another copy).
SOURCES = os.path.dirname(os.path.dirname(os.path.abspath(_demo.__file__)))

#: The demo in a child process whose traffic starts with a SIGTERM to itself (``docker stop`` at that moment).
CHILD = textwrap.dedent(
    """
    import os, signal, sys

    from lago_org_billing import _demo
    from lago_org_billing.cli import main

    drive = _demo._drive

    async def drive_after_a_sigterm(app_url):
        os.kill(os.getpid(), signal.SIGTERM)
        return await drive(app_url)

    _demo._drive = drive_after_a_sigterm
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("command", [["demo"], ["demo", "--serve"]], ids=["demo", "serve"])
def test_sigterm_while_the_demos_traffic_runs_stops_it_as_ctrl_c_does(command: list[str]) -> None:
    """Exit 130 (interrupted before serving), no report, no serving, nothing on stderr: before, the child died by the
    signal (-15), and as PID 1 ``demo --serve`` ignored it and served on."""
    path = os.pathsep.join(filter(None, [SOURCES, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "LANG": "C"}
    child = subprocess.run([sys.executable, "-c", CHILD, *command], capture_output=True, timeout=60, env=env)
    out, err = child.stdout.decode(), child.stderr.decode()
    assert child.returncode == 130, (child.returncode, out, err)
    assert not err, err
    assert "Example API:" in out  # it was interrupted while its traffic ran...
    assert "Per org" not in out and "Serving until Ctrl-C" not in out  # ...and went no further


def test_a_sigterm_while_the_servers_stop_is_held_as_a_ctrl_c_is() -> None:
    """Within :func:`_demo._interrupts_deferred` (the servers stopping), a SIGTERM is held until the body is over, then
    raised as the Ctrl-C it stands for; it raised at once, in the middle of the servers' stopping."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    before = signal.getsignal(signal.SIGTERM)
    stopped = []
    with pytest.raises(KeyboardInterrupt), _demo._stopped_by_sigterm():
        with _demo._interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            stopped.append("servers")  # the body goes on to its end
    assert stopped == ["servers"]
    assert signal.getsignal(signal.SIGTERM) is before  # put back as it was
