"""The docker stack's scenario, from the host, with a real client (slixmpp): what a tester's app does.

alice registers a device with knock (`register-push-apns` to push.localhost), enables push at her server with the
node and secret knock gave (XEP-0357), goes offline; bob sends her a message; the push for her token must show
up at the mock APNs' `GET /pushes/<token>`, and knock's /health must answer 200.

    python scenario.py --server prosody --c2s-port 5222 --health http://127.0.0.1:9357/health \
        --pushes http://127.0.0.1:8080

Prints one `PASS <server>: <step> (<seconds>)` or `FAIL <server>: <step> — <reason>` line per step and exits
non-zero at the first failure. Run with the prosody-test venv's python (slixmpp 1.17).
"""

import argparse
import asyncio
import json
import logging
import secrets
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "harness"))
from client import Client, StepFailed  # noqa: E402

APP_SERVER = "push.localhost"


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Steps:
    def __init__(self, server: str):
        self.server = server
        self.failed = False

    async def run(self, name: str, coro):
        t0 = time.monotonic()
        try:
            result = await coro
        except (StepFailed, OSError, asyncio.TimeoutError, ValueError) as e:
            print(f"FAIL {self.server}: {name} — {e}", flush=True)
            self.failed = True
            raise SystemExit(1)
        print(f"PASS {self.server}: {name} ({time.monotonic() - t0:.1f} s)", flush=True)
        return result


async def login(jid: str, password: str, port: int, deadline: float) -> Client:
    """Log in, retrying until `deadline` (the server may still be starting)."""
    last = ""
    while True:
        client = Client(jid, password)
        try:
            return await client.online(port, timeout=5)
        except StepFailed as e:
            last = str(e)
            if client.auth_failed or time.monotonic() > deadline:
                raise StepFailed(last)
        await asyncio.sleep(1)


async def wait_health(url: str, deadline: float) -> str:
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = http_get(url)
            if status == 200:
                return body.decode(errors="replace")
            last = f"{status} {body.decode(errors='replace')}"
        except OSError as e:
            last = str(e)
        await asyncio.sleep(0.5)
    raise StepFailed(f"{url} never answered 200 (last: {last})")


async def wait_push(pushes: str, token: str, deadline: float) -> dict:
    url = f"{pushes}/pushes/{token}"
    while time.monotonic() < deadline:
        status, body = http_get(url)
        if status != 200:
            raise StepFailed(f"GET {url}: {status}")
        got = json.loads(body)
        if got:
            if len(got) != 1:
                raise StepFailed(f"{len(got)} pushes for the token, expected 1: {got}")
            return got[0]
        await asyncio.sleep(0.3)
    raise StepFailed(f"no push for alice's token at {url} within the time allowed")


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="prosody")
    ap.add_argument("--c2s-port", type=int, default=5222)
    ap.add_argument("--health", default="http://127.0.0.1:9357/health")
    ap.add_argument("--pushes", default="http://127.0.0.1:8080")
    ap.add_argument("--alice-password", default="alice")
    ap.add_argument("--bob-password", default="bob")
    ap.add_argument("--topic", default="im.knock.docker")
    ap.add_argument("--wait", type=float, default=60, help="seconds the stack may take to come up")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR)
    steps = Steps(args.server)
    token = secrets.token_hex(32)
    device = "docker-check-" + secrets.token_hex(4)
    message = "hello from the docker check " + secrets.token_hex(4)

    # knock's /health is 200 once its component link to the server is up
    await steps.run("knock /health 200 (link up)", wait_health(args.health, time.monotonic() + args.wait))
    alice = await steps.run("alice logs in", login("alice@localhost", args.alice_password, args.c2s_port,
                                                    time.monotonic() + args.wait))
    jid, node, secret = await steps.run(f"register-push-apns at {APP_SERVER}",
                                        alice.register_device(APP_SERVER, device, token))
    await steps.run("<enable/> at the server (XEP-0357)", alice.enable_push(APP_SERVER, node, secret))
    await alice.offline()
    bob = await steps.run("bob logs in", login("bob@localhost", args.bob_password, args.c2s_port,
                                                time.monotonic() + 10))
    bob.send_message(mto="alice@localhost", mbody=message, mtype="chat")
    await asyncio.sleep(0.2)
    await bob.offline()

    async def push_seen():
        push = await wait_push(args.pushes, token, time.monotonic() + 20)
        if push.get("status") != 200:
            raise StepFailed(f"the mock answered {push.get('status')} {push.get('reason')}: {push}")
        if push.get("topic") != args.topic:
            raise StepFailed(f"topic {push.get('topic')!r}, expected {args.topic!r}")
        body = json.dumps(push.get("body"))
        if message in body:
            raise StepFailed(f"the message text is in the push: {body}")
        return push
    push = await steps.run("bob's message -> push at the mock's /pushes", push_seen())
    print(f"  push: push_type={push.get('push_type')} priority={push.get('priority')} "
          f"body={json.dumps(push.get('body'))}", file=sys.stderr)

    async def message_kept():
        back = await login("alice@localhost", args.alice_password, args.c2s_port, time.monotonic() + 10)
        try:
            if not await back.expect_message(message, timeout=10):
                raise StepFailed("the message did not come back from offline storage")
        finally:
            await back.offline()
    await steps.run("alice gets the message from offline storage", message_kept())
    await steps.run("knock /health 200", wait_health(args.health, time.monotonic() + 5))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
