"""Where a server's CPU goes per request, from ``perf`` samples: bare vs billing apps, in microseconds per request.

overhead.py says how much slower a billing app serves; opcodes.py counts its bytecodes. This says in which part
of the machine the extra time is spent: the interpreter's bytecode loop, the rest of libpython (allocation, dict
lookups...), the kernel (sockets, wakeups), C extensions. Each app runs in its own uvicorn process pinned to CPU 0
(as in overhead.py: wrk and the emulator on CPU 1) while ``perf record`` samples it; each share of the samples is
turned into microseconds per request with the requests/s wrk measured in the same run.

    python benchmarks/where.py [--apps bare,request-path,billed] [--seconds 12] [--top 12]

Needs perf (apt-get install linux-perf or linux-tools), wrk and taskset, and a kernel that lets this user
sample (``/proc/sys/kernel/perf_event_paranoid`` <= 1, or root).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._here import use_this_checkout  # noqa: E402

use_this_checkout()

from benchmarks.overhead import HEADERS, app_env, emulator, free_port, process, uvicorn_command, wait_http  # noqa: E402

#: What a sample is charged to: the bytecode loop by its symbol, the rest by the object it ran in.
EVAL = "_PyEval_EvalFrameDefault"


def _sample(app: str, seconds: int, data: Path) -> float:
    """Serve ``app`` under wrk for ``seconds``, ``perf record`` its server for the middle of the run: requests/s."""
    with emulator() as (_, env):
        port = free_port()
        with process(uvicorn_command(app, port), {**env, **app_env(app)}, cpu="0") as server:
            url = f"http://127.0.0.1:{port}/v1/chat/abc"
            wait_http(url)
            headers = [arg for name, value in HEADERS.items() for arg in ("-H", f"{name}: {value}")]
            load = subprocess.Popen(
                ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", *headers, url],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(min(2, seconds / 4))  # (wrk's warm-up: the connections opened, the caches filled)
            record = ["perf", "record", "-q", "-F", "1999", "-p", str(server.pid), "-o", str(data)]
            subprocess.run([*record, "--", "sleep", str(max(1, seconds - 4))], capture_output=True, check=True)
            out, _ = load.communicate()
    found = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not found:
        raise RuntimeError(f"wrk printed no requests/s:\n{out}")
    return float(found.group(1))


def _shares(data: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """(percent of samples by part, percent by symbol) of one ``perf record``."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none", "--sort", "dso,symbol"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    parts: collections.Counter[str] = collections.Counter()
    symbols: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        row = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(\S+)", line)
        if not row:
            continue
        share, dso, kind, symbol = float(row.group(1)), row.group(2), row.group(3), row.group(4)
        if symbol == EVAL:
            part = "bytecode loop"
        elif kind == "k":
            part = "kernel"
        elif dso.startswith("libpython"):
            part = "libpython (the rest)"
        else:
            part = re.sub(r"\.cpython-.*", "", dso)
        parts[part] += share
        symbols[symbol] += share
    return parts, symbols


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", default="bare,request-path,billed")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for tool in ("perf", "wrk", "taskset"):
        if not shutil.which(tool):
            print(f"{tool} not found: see this script's docstring", file=sys.stderr)
            return 2
    apps = args.apps.split(",")
    if apps[0] != "bare":
        apps.insert(0, "bare")
    per_request: dict[str, float] = {}
    parts: dict[str, collections.Counter[str]] = {}
    symbols: dict[str, collections.Counter[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for app in apps:
            rps = _sample(app, args.seconds, Path(tmp) / f"{app}.data")
            per_request[app] = 1e6 / rps
            shares, by_symbol = _shares(Path(tmp) / f"{app}.data")
            parts[app] = collections.Counter({k: v * per_request[app] / 100 for k, v in shares.items()})
            symbols[app] = collections.Counter({k: v * per_request[app] / 100 for k, v in by_symbol.items()})
            print(f"{app:16s} {rps:8.0f} req/s  {per_request[app]:6.1f} µs/request", flush=True)
    names = sorted({name for counter in parts.values() for name in counter}, key=lambda n: -parts["bare"][n])
    print("\nµs per request by part (the difference to bare in brackets):")
    print(f"{'part':24s}" + "".join(f"{app:>22s}" for app in apps))
    for name in [n for n in names if max(c[n] for c in parts.values()) >= 0.05]:
        cells = [f"{parts['bare'][name]:8.2f}"] + [
            f"{parts[app][name]:8.2f} ({parts[app][name] - parts['bare'][name]:+6.2f})" for app in apps[1:]
        ]
        print(f"{name:24s}" + "".join(f"{cell:>22s}" for cell in cells))
    for app in apps[1:]:
        print(f"\n{app}: the symbols that grew most over bare (µs per request)")
        grown = {name: symbols[app][name] - symbols["bare"][name] for name in symbols[app] | symbols["bare"]}
        for name, extra in sorted(grown.items(), key=lambda item: -item[1])[: args.top]:
            print(f"  {extra:+6.2f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
