"""Two knock processes for one component (issue 20's active/standby), against the real servers.

Prosody 0.12 accepts one connection per component JID and refuses a second one that gets the secret right with
`<stream:error><conflict/>` ("Component already connected"). The second knock is then a standby: it says so
once, shows `standby` in /health and /metrics, and knocks again every 250 ms (the tests' `standby_retry_ms`;
knock's default is 1 s); when the active knock is killed
with SIGKILL, the standby must be answering IQs within 2 s. ejabberd 23.01 accepts both connections and spreads
stanzas over them (active/active): both knocks must answer.

Each knock has its own sled store here (scenario 19, postgres_scenarios.py, runs two on one PostgreSQL), so a
device registers again after the takeover, and on ejabberd the scenario sends only disco#info and pings, which any
instance answers the same: with separate stores, a publish landing on the instance that does not hold the
registration is answered item-not-found, which ejabberd punishes by disabling the user's push.

The bed's knock reaches the server through the bed's wiretap; the second one through a byte relay of its own
here, which records when its handshake completed and which IQ ids the server sent it.
"""

import asyncio
import json
import os
import secrets
import shutil
import signal
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

from bed import COMPONENT, DOMAIN, Knock
from procs import LogWatch, free_port, wait_for
from scenarios import Ctx, Failure, check, new_token, text_for
from slixmpp.exceptions import IqError, IqTimeout
from wiretap import Wiretap

# The bound for a standby to be serving after the active knock dies (knock's design: about 250 ms).
TAKEOVER_BOUND = 2.0
# What Prosody 0.12's mod_component logs (at error level) for each refused duplicate.
PROSODY_DUPLICATE_LOG = "Second component attempted to connect"


class Relay:
    """A transparent TCP relay to the server's component port that keeps, per connection, when it opened,
    when the server's `<handshake/>` arrived, when it closed, and every byte the server sent (a few KiB here)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.server = None
        self.links: list[dict] = []
        self.tasks: set = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self):
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def up_at(self):
        """When the newest connection's handshake completed, if it is still open; else None."""
        for link in reversed(self.links):
            if link["handshake"] is not None:
                return link["handshake"] if link["closed"] is None else None
        return None

    def received(self, text: str) -> bool:
        """Whether the server sent `text` on any connection."""
        needle = text.encode()
        return any(needle in link["from_server"] for link in self.links)

    async def _accept(self, k_reader, k_writer):
        link = {"opened": time.monotonic(), "handshake": None, "closed": None, "from_server": bytearray()}
        self.links.append(link)
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            k_writer.close()
            link["closed"] = time.monotonic()
            self.tasks.discard(task)
            return

        async def pump(reader, writer, keep):
            try:
                while data := await reader.read(65536):
                    if keep:
                        link["from_server"] += data
                        if link["handshake"] is None and b"<handshake" in link["from_server"]:
                            link["handshake"] = time.monotonic()
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass

        pumps = [asyncio.create_task(pump(s_reader, k_writer, True)),
                 asyncio.create_task(pump(k_reader, s_writer, False))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            for w in (k_writer, s_writer):
                w.close()
            link["closed"] = time.monotonic()
            self.tasks.discard(task)


class Second:
    """A second knock beside the bed's: the same apps and secret, its own log and admin listener, and its own
    sled store unless `store_toml` gives another [store] (scenarios 19-20: a shared PostgreSQL; `key_from`, a
    store key file to share). With `tap`, it reaches the server through a Wiretap of its own (which sees every
    publish and the reply) rather than the plain Relay."""

    def __init__(self, ctx: Ctx, name: str = "knock-second", tap: bool = False, store_toml: str | None = None,
                 key_from: str | None = None):
        bed = ctx.bed
        self.relay = (Wiretap if tap else Relay)(bed.server.component_port)
        self.admin = f"127.0.0.1:{free_port()}"
        self.knock = None
        self.bed = bed
        self.name = name
        self.store_toml = store_toml
        self.key_from = key_from

    async def start(self):
        bed = self.bed
        port = await self.relay.start()
        run_dir = f"{bed.dir}/{self.name}"
        if self.key_from:
            os.makedirs(run_dir, exist_ok=True)
            shutil.copyfile(self.key_from, f"{run_dir}/store.key")
        self.knock = Knock(bed.registry, bed.knock.bin, run_dir, port, bed.component_secret, bed.apns)
        if self.store_toml:
            self.knock.store_toml = self.store_toml
        self.knock.write_config(bed.knock.apps)
        with open(self.knock.config, "a") as f:
            f.write(f'\n[admin]\nlisten = "{self.admin}"\n')
        self.knock.start()

    def get(self, path: str):
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return None, ""

    def metric(self, name: str):
        """A sample's value; `name` may carry its labels (`knock_registrations_total{outcome="saved"}`)."""
        status, body = self.get("/metrics")
        for line in body.splitlines():
            if line.startswith(name + " "):
                return int(float(line.split()[1]))
        return None

    def health(self):
        status, body = self.get("/health")
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {}

    def log(self, mark: int = 0) -> str:
        return LogWatch(self.knock.log_file).since(mark)

    async def stop(self):
        if self.knock is not None:
            await self.knock.stop()
        await self.relay.close()


async def disco(c, iq_id: str, timeout: float = 5.0):
    """disco#info to knock with our own IQ id (so the relay can tell which knock got it); the reply."""
    iq = c.Iq()
    iq["id"] = iq_id
    iq["type"] = "get"
    iq["to"] = COMPONENT
    iq.enable("disco_info")
    return await iq.send(timeout=timeout)


async def ping(c, timeout: float = 5.0):
    iq = c.Iq()
    iq["type"] = "get"
    iq["to"] = COMPONENT
    iq.append(ET.fromstring("<ping xmlns='urn:xmpp:ping'/>"))
    return await iq.send(timeout=timeout)


async def spread(ctx: Ctx, c, second: Second, n: int) -> tuple[int, int]:
    """`n` disco#info queries, each answered; how many the server gave the second knock, and the bed's."""
    ids = [f"fo-{secrets.token_hex(4)}-{i}" for i in range(n)]
    for iq_id in ids:
        try:
            reply = await disco(c, iq_id)
        except (IqError, IqTimeout) as e:
            raise Failure(f"disco#info {iq_id} to {COMPONENT} not answered: {e}")
        check(reply["type"] == "result", f"disco#info answered {reply['type']}")
    await asyncio.sleep(0.1)  # the relay's copy of the last query
    to_second = sum(1 for i in ids if second.relay.received(f"'{i}'") or second.relay.received(f'"{i}"'))
    return to_second, n - to_second


async def wait_log(read, text: str, timeout: float, what: str):
    try:
        await wait_for(lambda: text in read(), timeout, what)
    except TimeoutError:
        raise Failure(f"{what}: never logged {text!r} within {timeout:g} s")


async def first_answer_after(c, t0: float, bound: float) -> float:
    """Poll disco#info until knock answers; seconds after t0 of the first answer. The server answers for a
    missing component itself (an error), so a poll is quick either way; but one the server hands the dying
    knock's connection is lost without a reply, so a poll goes out every 25 ms without waiting for the last:
    a lost one does not hold the measurement up by its timeout."""
    deadline = t0 + bound + 5
    answers: list[float] = []
    polls = set()

    async def poll(n: int):
        try:
            reply = await disco(c, f"fo-poll-{n}", timeout=1)
            if reply["type"] == "result":
                answers.append(time.monotonic())
        except (IqError, IqTimeout):
            pass
    n = 0
    try:
        while not answers and time.monotonic() < deadline:
            n += 1
            polls.add(asyncio.create_task(poll(n)))
            await asyncio.sleep(0.025)
    finally:
        for p in polls:
            p.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
    if not answers:
        raise Failure(f"no disco#info answer from {COMPONENT} within {bound + 5:g} s of killing the active knock")
    return min(answers) - t0


async def restore(bed, second: Second):
    """Whatever happened, leave the bed as the other scenarios expect it: its own knock alone on the link."""
    await second.stop()
    if not bed.knock.alive():
        bed.knock.start()
    await bed.wait_link(10)


async def prosody_standby(ctx: Ctx):
    bed = ctx.bed
    second = Second(ctx)
    try:
        c = await ctx.login("f18")
        prosody_mark = bed.server.log().size()
        await second.start()
        # 1. Refused as a duplicate: a standby that says so once, in its log, /health and /metrics.
        await wait_log(second.log, "standing by, taking over when it lets go", 10, "the second knock")
        await wait_for(lambda: second.metric("knock_component_link_standby") == 1, 10, "the standby gauge")
        check(second.metric("knock_component_link_up") == 0, "a standby says its link is up")
        status, health = second.health()
        check(status == 200 and health.get("status") == "standby", f"/health of the standby: {status} {health}")
        # 2. Quiet while it waits: it knocks every 250 ms, and neither knock's log grows by a line per attempt.
        log_mark = LogWatch(second.knock.log_file).size()
        refusals_before = bed.server.log().since(prosody_mark).count(PROSODY_DUPLICATE_LOG)
        await asyncio.sleep(2)
        window = bed.server.log().since(prosody_mark)
        refusals = window.count(PROSODY_DUPLICATE_LOG) - refusals_before
        extra = [l for l in second.log(log_mark).splitlines() if l.strip()]
        ctx.note(f"standby: refused {refusals} times in 2 s by Prosody (each an error line in its log: "
                 f"\"{PROSODY_DUPLICATE_LOG}, denying connection\"); {len(extra)} line(s) in the standby's log")
        check(refusals >= 5, f"the standby knocked only {refusals} times in 2 s: it backs off")
        check(len(extra) <= 1, f"the standby logs its attempts: {extra[:3]}")
        check(bed.tap.link_up(), "the active knock lost its link to the standby's attempts")
        reply = await disco(c, "fo-before")
        check(reply["type"] == "result", "the active knock does not answer")
        check(not second.relay.received("fo-before"), "Prosody sent an IQ to the standby")

        # 3. kill -9 the active knock: the standby takes the link and answers.
        t0 = time.monotonic()
        await bed.knock.stop(sig=signal.SIGKILL)
        answered = await first_answer_after(c, t0, TAKEOVER_BOUND)
        up = second.relay.up_at()
        check(up is not None, "the standby answered, but its relay saw no handshake")
        ctx.note(f"takeover: the standby's handshake {up - t0:.3f} s after SIGKILL, first disco#info answered "
                 f"after {answered:.3f} s")
        check(answered < TAKEOVER_BOUND, f"the standby answered only {answered:.2f} s after SIGKILL")
        await wait_log(second.log, "has taken over", 5, "the new active knock")
        await wait_for(lambda: second.metric("knock_component_link_up") == 1, 5, "the new active's link gauge")
        check(second.metric("knock_component_link_standby") == 0, "the new active still says standby")

        # 4. The whole job through the new active knock: ping, disco, and (its own store: register again)
        # register -> enable -> offline -> message -> push.
        await ping(c)
        user, token = "f18", new_token()
        jid, node, secret = await c.register_device(COMPONENT, "phone", token)
        check(second.relay.received("register-push-apns"), "the registration did not reach the new active knock")
        await c.enable_push(COMPONENT, node, secret)
        await ctx.go_offline(c)
        await ctx.send(user, text_for("s18"))
        reqs = await ctx.expect_pushes(token, 0, 1)
        check(reqs[0]["status"] == 200, f"push answered {reqs[0]['status']}")

        # 5. The killed knock comes back as the standby; the other stops (SIGTERM): it takes over again.
        mark = bed.knock_log_size()
        bed.knock.start()
        await wait_log(lambda: bed.knock_log_since(mark), "standing by", 10, "the restarted knock")
        t1 = time.monotonic()
        await second.knock.stop()
        await bed.wait_link(5)
        back = bed.tap.last_up_at() - t1
        ctx.note(f"handover back: the restarted knock's handshake {back:.3f} s after SIGTERM to the other began")
        check(back < TAKEOVER_BOUND, f"the standby took {back:.2f} s after the active knock stopped")
        ctx.summary = f"takeover {answered:.2f} s after SIGKILL (handshake {up - t0:.2f} s), back {back:.2f} s"
    finally:
        await restore(bed, second)


async def ejabberd_active_active(ctx: Ctx):
    bed = ctx.bed
    second = Second(ctx)
    try:
        c = await ctx.login("f18")
        await second.start()
        # 1. ejabberd accepts both: the second knock's link is up, it is no standby.
        await wait_for(lambda: second.relay.up_at() is not None, 10, "the second knock's handshake")
        await wait_for(lambda: second.metric("knock_component_link_up") == 1, 10, "the second knock's link gauge")
        check(second.metric("knock_component_link_standby") == 0, "the second knock stands by on ejabberd")
        check(bed.tap.link_up(), "the bed's knock lost its link when the second one connected")
        # 2. Both answer: ejabberd spreads one client's queries over both connections.
        n = 12
        to_second, to_first = await spread(ctx, c, second, n)
        ctx.note(f"active/active: of {n} disco#info queries ejabberd gave {to_first} to the bed's knock and "
                 f"{to_second} to the second; all answered")
        check(to_first > 0 and to_second > 0, f"ejabberd sent all {n} queries to one knock ({to_first}/{to_second})")
        split = f"{to_first}/{to_second} of {n}"
        # 3. kill -9 one: the other answers everything at once.
        t0 = time.monotonic()
        await bed.knock.stop(sig=signal.SIGKILL)
        survivor, elsewhere = await spread(ctx, c, second, 8)
        check(survivor == 8, f"after SIGKILL to the other, {elsewhere} of 8 queries went elsewhere")
        ctx.note(f"8 disco#info answered by the survivor within {time.monotonic() - t0:.2f} s of SIGKILL")
        await ping(c)
        ctx.summary = f"both knocks answered ({split}); the survivor all 8 after SIGKILL"
    finally:
        await restore(bed, second)


async def failover(ctx: Ctx):
    """Two knocks for one component: active/standby on Prosody, active/active on ejabberd."""
    if ctx.kind == "prosody":
        await prosody_standby(ctx)
    else:
        await ejabberd_active_active(ctx)


SCENARIOS = [("18-failover", failover)]
SERVERS: dict[str, set[str]] = {}
USERS = {"18-failover": ["f18"]}
