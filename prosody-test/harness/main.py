"""prosody-test/run: every scenario against Prosody and ejabberd. Called by the `run` wrapper, which builds the
binaries, installs the servers and slixmpp, and makes (and later removes) the run directory."""

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bed import Bed, find_bins, say  # noqa: E402
from procs import Registry  # noqa: E402
from scenarios import SCENARIOS as BASE_SCENARIOS, USERS, Ctx, Failure  # noqa: E402
import ios_scenarios  # noqa: E402
import android_scenarios  # noqa: E402
import failover_scenarios  # noqa: E402
import postgres_scenarios  # noqa: E402
import knock_scenarios  # noqa: E402
from client import StepFailed  # noqa: E402
import tigase_crypto  # noqa: E402

SCENARIO_TIMEOUT = 90
# the client dialects' scenarios, each module with its SCENARIOS, SERVERS (where not both) and USERS
DIALECTS = (ios_scenarios, android_scenarios, failover_scenarios, postgres_scenarios, knock_scenarios)
SCENARIOS = BASE_SCENARIOS + [s for m in DIALECTS for s in m.SCENARIOS]
SERVERS = {name: kinds for m in DIALECTS for name, kinds in m.SERVERS.items()}
DIALECT_USERS = {name: users for m in DIALECTS for name, users in m.USERS.items()}


def runs_on(name: str, kind: str) -> bool:
    return kind in SERVERS.get(name, {"prosody", "ejabberd"})


def result(line: str):
    try:
        print(line, flush=True)
    except (BrokenPipeError, OSError):
        pass


async def run_server(kind: str, selected, run_dir: str, bins, registry, counts, verbose: bool):
    selected = [(n, f) for n, f in selected if runs_on(n, kind)]
    if not selected:
        return
    users = USERS + [u for n, _ in selected for u in DIALECT_USERS.get(n, [])] + ["bob"]
    bed = Bed(kind, run_dir, bins, registry, sabotage=os.environ.get("PT_SABOTAGE", ""))
    try:
        try:
            await bed.start(users)
        except Exception as e:
            reason = f"test bed did not start: {e}".replace("\n", " | ")[:600]
            say(bed.diagnostics())
            for name, _ in selected:
                result(f"FAIL {kind}: {name} — {reason}")
                counts["failed"] += 1
            return
        for name, fn in selected:
            ctx = Ctx(bed)
            t0 = time.monotonic()
            say(f"[{kind}] {name} ...")
            try:
                await asyncio.wait_for(bed.ensure_healthy(), 60)
                await asyncio.wait_for(fn(ctx), SCENARIO_TIMEOUT)
                extra = getattr(ctx, "summary", None)
                result(f"PASS {kind}: {name}" + (f" — {extra}" if extra else ""))
                counts["passed"] += 1
            except (Failure, StepFailed, TimeoutError, asyncio.TimeoutError, RuntimeError, OSError) as e:
                reason = str(e) or type(e).__name__
                if isinstance(e, asyncio.TimeoutError) and not str(e):
                    reason = f"scenario did not finish within {SCENARIO_TIMEOUT} s"
                result(f"FAIL {kind}: {name} — {reason}".replace("\n", " | ")[:1000])
                counts["failed"] += 1
                say(bed.diagnostics())
                if verbose:
                    traceback.print_exc()
            except asyncio.CancelledError:
                result(f"FAIL {kind}: {name} — interrupted")
                counts["failed"] += 1
                raise
            except Exception as e:
                result(f"FAIL {kind}: {name} — {type(e).__name__}: {e}".replace("\n", " | ")[:1000])
                counts["failed"] += 1
                traceback.print_exc()
                say(bed.diagnostics())
            finally:
                await ctx.close()
                say(f"[{kind}] {name} took {time.monotonic() - t0:.1f} s")
    finally:
        errors = await bed.stop()
        for e in errors:
            say(f"[{kind}] while stopping: {e}")


async def main():
    ap = argparse.ArgumentParser(prog="prosody-test/run")
    ap.add_argument("--server", choices=["prosody", "ejabberd", "all"], default="all")
    ap.add_argument("-k", dest="filter", default=None, help="run only scenarios whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--repo", required=True)
    args = ap.parse_args()

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL, stream=sys.stderr)
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    stopping = []

    def on_signal(sig):
        # first Ctrl-C / SIGTERM: cancel the run (the finally blocks stop everything); later ones are ignored
        # so they cannot interrupt that cleanup
        if not stopping:
            stopping.append(sig)
            say(f"signal {sig.name}: stopping everything")
            me.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    # the decryption the Tigase-dialect scenario relies on, checked against captured publishes first
    tigase_crypto.self_check()
    bins = find_bins(args.repo)
    registry = Registry(args.run_dir)
    servers = ["prosody", "ejabberd"] if args.server == "all" else [args.server]
    selected = [(n, f) for n, f in SCENARIOS if not args.filter or args.filter in n]
    if not selected:
        say(f"no scenario matches -k {args.filter!r}; names: {', '.join(n for n, _ in SCENARIOS)}")
    counts = {"passed": 0, "failed": 0}
    t0 = time.monotonic()
    try:
        for kind in (servers if selected else []):
            await run_server(kind, selected, args.run_dir, bins, registry, counts, args.verbose)
    finally:
        say(f"total {time.monotonic() - t0:.1f} s")
        result(f"{counts['passed']} passed, {counts['failed']} failed")
    return 1 if counts["failed"] or not selected else 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(130)
