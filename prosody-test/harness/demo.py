"""prosody-test/demo: Prosody + mock APNs + knock on 127.0.0.1, in the foreground, with a how-to. Called by the
`demo` wrapper. With --client, runs the register -> enable -> offline -> message -> push flow once, then a knock."""

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bed import COMPONENT, DOMAIN, TOPIC, Bed, find_bins  # noqa: E402
from client import PUBLISH_OPTIONS, REGISTER, UNREGISTER, Client  # noqa: E402
from procs import Registry, port_listening, tail  # noqa: E402
from scenarios import XDATA  # noqa: E402
import knock_scenarios  # noqa: E402

PASSWORD = "password"
PREFERRED = {"c2s_port": 15222, "component_port": 15347}


def out(text=""):
    try:
        print(text, flush=True)
    except (BrokenPipeError, OSError):
        pass  # the terminal or pipe is gone; keep going so everything still gets stopped


def howto(bed: Bed, run_dir: str):
    c2s = bed.server.c2s_port
    out(f"""
knock demo: Prosody + mock APNs + knock, all on 127.0.0.1 (Ctrl-C stops everything)

  XMPP (c2s)   127.0.0.1:{c2s}, no TLS (SCRAM or PLAIN over plain TCP is allowed here)
  users        alice@{DOMAIN} / {PASSWORD}      bob@{DOMAIN} / {PASSWORD}
  knock        {COMPONENT} (a component of Prosody on 127.0.0.1:{bed.server.component_port})
  mock APNs    {bed.apns.url} (topic {TOPIC}); control {bed.apns.control}

1. As alice, register a device with knock: XEP-0050 command node '{REGISTER}' at {COMPONENT},
   fields 'token' (64 hex digits, the APNs device token) and 'device-id' (any stable id):

   <iq type='set' to='{COMPONENT}' id='reg1'>
     <command xmlns='http://jabber.org/protocol/commands' node='{REGISTER}' action='execute'>
       <x xmlns='jabber:x:data' type='submit'>
         <field var='token'><value>{"ab" * 32}</value></field>
         <field var='device-id'><value>my-phone</value></field>
       </x></command></iq>

   The completed reply carries a form with 'jid' ({COMPONENT}), 'node' and 'secret'.
   ('{UNREGISTER}' with 'device-id' removes it again.)

2. Still as alice, enable push at Prosody with that node and secret (XEP-0357):

   <iq type='set' id='push1'>
     <enable xmlns='urn:xmpp:push:0' jid='{COMPONENT}' node='NODE'>
       <x xmlns='jabber:x:data' type='submit'>
         <field var='FORM_TYPE'><value>{PUBLISH_OPTIONS}</value></field>
         <field var='secret'><value>SECRET</value></field>
       </x></enable></iq>

3. Disconnect alice (without stream management), and send her a message as bob.
   The push knock sends shows up below, as the mock APNs logs it.

4. Knock tokens (xep/knock-registration.md §19): as alice, run the command 'knock-token-create' at {COMPONENT}
   (an empty submitted form takes the defaults); the reply's 'token' is for one contact. As bob, with it:

   <iq type='set' to='{COMPONENT}' id='k1'><knock xmlns='knock:token:0' token='TOKEN'/></iq>

   knock answers an empty result and wakes alice's device; the push names the token's 'id', never bob.
   'knock-token-list', '-revoke' and '-rotate' manage alice's tokens.

   Make a token fail:  curl -X POST {bed.apns.control}/behaviour/<token>/unregistered   (or unavailable, ok)
   All requests:       curl {bed.apns.control}/requests

Files: {run_dir}
  mock APNs requests  {bed.apns.requests_file}   (one JSON line per request)
  knock's log         {bed.knock.log_file}
  Prosody's log       {bed.server.log_file}
  Prosody's config    {bed.server.config}     (prosodyctl --config <it> register carol {DOMAIN} pw)

`prosody-test/demo --client` does steps 1-4 with a real client (slixmpp).
""")


async def client_flow(bed: Bed):
    token = secrets.token_hex(32)
    out(f"[client] alice logs in and registers device 'demo-phone' with token {token[:12]}...")
    alice = await Client(f"alice@{DOMAIN}/phone", PASSWORD).online(bed.server.c2s_port)
    jid, node, secret = await alice.register_device(COMPONENT, "demo-phone", token)
    out(f"[client] knock answered: jid={jid} node={node} secret={secret[:6]}...")
    await alice.enable_push(COMPONENT, node, secret)
    made = await knock_scenarios.command(alice, "knock-token-create", {})
    fields = {f.get("var"): f.findtext(f"{XDATA}value") for f in made.iter(f"{XDATA}field")}
    out(f"[client] alice made a knock token for bob: id {fields.get('id')}, expires {fields.get('expires')}")
    out("[client] alice enabled push at Prosody, and goes offline")
    await alice.offline()
    await asyncio.sleep(0.3)
    bob = await Client(f"bob@{DOMAIN}/desk", PASSWORD).online(bed.server.c2s_port)
    bob.send_message(mto=f"alice@{DOMAIN}", mbody="Hi Alice, this text never reaches Apple", mtype="chat")
    out("[client] bob sent alice a message; waiting for the push...")
    reqs = await bed.apns.wait_requests(token, 1, 10)
    if not reqs:
        await bob.offline()
        out("[client] no push arrived within 10 s; see knock's log")
        return False
    r = reqs[0]
    out(f"[client] push arrived at the mock APNs: status {r['status']}, apns-push-type {r['push_type']}, "
        f"priority {r['priority']}, body {r['body']}")
    answer = await knock_scenarios.knock(None, fields.get("token"), bob)
    out(f"[client] bob knocked with alice's token: {answer}")
    reqs = await bed.apns.wait_requests(token, 2, 10)
    await bob.offline()
    if len(reqs) < 2:
        out("[client] no knock push arrived within 10 s; see knock's log")
        return False
    out(f"[client] the knock's push arrived: priority {reqs[1]['priority']}, body {reqs[1]['body']}")
    return True


def describe(line: str) -> str | None:
    try:
        e = json.loads(line)
    except ValueError:
        return None
    if e.get("event") != "request":
        return None
    tok = e.get("token", "")
    return (f"[mock APNs] push to {tok[:12]}... topic={e.get('topic')} type={e.get('push_type')} "
            f"priority={e.get('priority')} -> {e.get('status')}{' ' + e['reason'] if e.get('reason') else ''}")


async def main():
    ap = argparse.ArgumentParser(prog="prosody-test/demo")
    ap.add_argument("--client", action="store_true", help="run the register/enable/message flow once")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--repo", required=True)
    args = ap.parse_args()

    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    stopping = []

    def on_signal():
        if not stopping:
            stopping.append(1)
            me.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    bins = find_bins(args.repo)
    registry = Registry(args.run_dir)
    ports = {k: v for k, v in PREFERRED.items() if not port_listening(v)}
    bed = Bed("prosody", args.run_dir, bins, registry, tap=False, password=PASSWORD, ports=ports,
              pin_background=False)
    rc = 0
    try:
        await bed.start(["alice", "bob"])
        howto(bed, args.run_dir)
        if args.client and not await client_flow(bed):
            rc = 1
        out("Watching the mock APNs (Ctrl-C to stop)...")
        pos = 0
        while True:
            with open(bed.apns.requests_file, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            done = chunk[:chunk.rfind(b"\n") + 1]
            pos += len(done)
            for line in done.decode("utf-8", "replace").splitlines():
                text = describe(line)
                if text:
                    out(text)
            for name, proc in (("knock", bed.knock.proc), ("prosody", bed.server.proc),
                               ("mock-apns", bed.apns.proc), ("mock-fcm", bed.fcm.proc)):
                if proc is not None and not proc.alive():
                    out(f"{name} exited ({proc.returncode()}); stopping. Its log:\n{tail(proc.log_path)}")
                    return 1
            await asyncio.sleep(0.2)
    except asyncio.CancelledError:
        return rc
    except Exception as e:
        out(f"demo failed: {e}")
        return 1
    finally:
        out("stopping knock, Prosody and the mocks...")
        await bed.stop()


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(0)
