"""knock on a shared PostgreSQL store (issue 20) against the real servers: failover with no registration lost
(19), and the database restarted under a steady message flow (20).

For these the bed's own knock (sled, behind the bed's wiretap) steps aside: the scenario starts a throwaway
PostgreSQL (testkit's pg-cluster, pg.py) and one or two knocks on it, each with its own config directory, the same
store key as the bed's knock, `[store] engine = "postgres"`, the password in a file, `standby_retry_ms = 250`, and
each behind a Wiretap of its own (failover_scenarios.Second), so every publish the server sends either knock and
the reply to it are seen. At the end the knocks and the database go, and the bed's knock is back on the link.

Prosody takes one knock (active/standby); ejabberd takes both and spreads the stanzas (active/active).
"""

import asyncio
import os
import re
import signal
import time

from bed import COMPONENT
from client import StepFailed
from failover_scenarios import TAKEOVER_BOUND, Second, disco, first_answer_after, wait_log
from pg import PgCluster
from procs import wait_for
from scenarios import DISABLED_LOG, Ctx, Failure, check, new_token, text_for

# Messages in scenario 19's burst, the pause between two, and how many go before the kill.
BURST = 30
BURST_PAUSE = 0.06
KILL_AT = 10
# Scenario 20: a message every FLOW_PAUSE; the database is killed after FLOW_LEAD and kept down at least
# OUTAGE (and until the registration attempted meanwhile has been answered); the flow goes on FLOW_TAIL after.
FLOW_PAUSE = 0.1
FLOW_LEAD = 0.8
OUTAGE = 3.0
FLOW_TAIL = 1.5
# How long after the database is back a registration may still be answered `wait` (knock reconnects with a
# pause doubling from 100 ms up to 1 s).
RECOVERY_BOUND = 5.0
# Failure: ejabberd spread this many messages and none reached the instance without the registration.
SPREAD_TRIES = 12


class PgKnocks:
    """A throwaway PostgreSQL and `n` knocks on it, in place of the bed's knock."""

    def __init__(self, ctx: Ctx, label: str):
        self.ctx = ctx
        self.bed = ctx.bed
        self.label = label
        self.pg = PgCluster(self.bed.registry, self.bed.bins["pg-cluster"], f"{self.bed.dir}/pg-{label}")
        self.knocks: list[Second] = []

    async def start(self, n: int):
        bed = self.bed
        await bed.knock.stop()  # SIGTERM: its link goes, so Prosody takes the next knock for the JID
        await self.pg.start()
        self.ctx.note(f"PostgreSQL (pg-cluster) ready in {self.pg.started_in:.1f} s on {self.pg.url}")
        for i in range(n):
            k = Second(self.ctx, name=f"knock-{self.label}{'ab'[i]}", tap=True, store_toml=self.pg.store_toml(),
                       key_from=os.path.join(bed.knock.dir, "store.key"))
            self.knocks.append(k)
            await k.start()
            if i == 0:  # the first one is the active one on Prosody
                await self.wait_serving(k, 15)

    async def wait_serving(self, k: Second, timeout: float):
        def up():
            if not k.knock.alive():
                raise Failure(f"{k.name} exited: {k.log()[-800:]}")
            return k.relay.link_up() and k.metric("knock_component_link_up") == 1
        try:
            await wait_for(up, timeout, f"{k.name}'s component link")
        except TimeoutError:
            raise Failure(f"{k.name} (PostgreSQL store) not on the link within {timeout:g} s: {k.log()[-800:]}")

    def publishes(self, node: str, since: float = 0.0):
        """Every publish for `node` any of these knocks was sent, in order, with the knock that got it."""
        return sorted(((p, k) for k in self.knocks for p in k.relay.publishes_to(node, since)),
                      key=lambda pk: pk[0].at)

    async def settle(self, node: str, since: float, timeout: float = 15.0):
        """Wait until every publish for `node` since `since` that went to a living knock has been answered."""
        def done():
            return all(p.reply for p, k in self.publishes(node, since) if k.knock.alive())
        try:
            await wait_for(done, timeout, "the knocks' replies")
        except TimeoutError:
            left = [p for p, k in self.publishes(node, since) if k.knock.alive() and not p.reply]
            raise Failure(f"{len(left)} publish(es) to a living knock unanswered after {timeout:g} s: {left[:3]}")
        return self.publishes(node, since)

    def check_logs(self):
        """The database password is in no knock's log (it is only in the password file)."""
        password = self.pg.info.get("password")
        for k in self.knocks:
            check(not password or password not in k.log(), f"{k.name}'s log holds the database password")

    async def close(self):
        bed = self.bed
        for k in self.knocks:
            await k.stop()
        await self.pg.stop()
        if not bed.knock.alive():
            bed.knock.start()
        await bed.wait_link(10)


async def register(c, token: str, device: str = "phone"):
    jid, node, secret = await c.register_device(COMPONENT, device, token)
    check(jid == COMPONENT and node and secret, f"register-push-apns gave jid={jid!r} and an empty node or secret")
    return node, secret


def error_of(e: StepFailed) -> str:
    """`type/condition` of a failed registration (client.py's message), or the message itself."""
    m = re.search(r"failed: (\w+)/([\w-]+)", str(e))
    return f"{m.group(1)}/{m.group(2)}" if m else str(e)


async def no_disable(ctx: Ctx, mark: int, what: str):
    """The server did not log disabling anyone's push since `mark`."""
    log = ctx.server_log().since(mark)
    m = re.search(DISABLED_LOG[ctx.kind], log)
    check(not m, f"{ctx.kind} disabled push {what}: {m.group(0)[:200] if m else ''}")


async def one_more(ctx: Ctx, pk: PgKnocks, user: str, node: str, token: str, what: str) -> str:
    """One message to offline `user`: one publish, answered `result`, one more push. The knock that served it."""
    before = len(ctx.bed.apns.requests(token))
    since = time.monotonic()
    await ctx.send(user, text_for(what))
    try:
        await wait_for(lambda: (lambda ps: ps and all(p.reply for p, _ in ps))(pk.publishes(node, since)), 10,
                       f"the publish for {what}")
    except TimeoutError:
        raise Failure(f"{what}: no answered publish within 10 s (the server no longer publishes for {user}?)")
    p, k = pk.publishes(node, since)[0]
    check(p.reply == "result", f"{what}: {k.name} answered the publish with {p.reply}")
    await ctx.expect_pushes(token, before, 1)
    return k.name


# ------------------------------------------------------------------------------------------------ 19

async def failover_postgres(ctx: Ctx):
    """Two knocks on one PostgreSQL; kill -9 the serving one in the middle of a message burst."""
    bed = ctx.bed
    pk = PgKnocks(ctx, "19")
    try:
        await pk.start(2)
        a, b = pk.knocks
        if ctx.kind == "prosody":
            await wait_log(b.log, "standing by", 10, b.name)
            await wait_for(lambda: b.metric("knock_component_link_standby") == 1, 10, "the standby gauge")
        else:
            await pk.wait_serving(b, 10)
        mark = ctx.server_log().size()

        # 1. Registrations, through whichever knock the server hands them to.
        user, token = "f19", new_token()
        c = await ctx.login(user)
        saved = {k.name: k.metric('knock_registrations_total{outcome="saved"}') or 0 for k in pk.knocks}
        node, secret = await register(c, token)
        acked = time.monotonic()
        registrar = [k for k in pk.knocks
                     if (k.metric('knock_registrations_total{outcome="saved"}') or 0) > saved[k.name]]
        check(len(registrar) == 1, f"the registration was saved by {len(registrar)} knocks")
        coherence = ""
        if ctx.kind == "ejabberd":
            # active/active: the other knock holds the registration in memory within a bounded time
            other = b if registrar[0] is a else a
            await wait_for(lambda: (other.metric("knock_stored_registrations") or 0) >= 1, 5,
                           f"{other.name} to learn of the registration made through {registrar[0].name}")
            coherence = f"{(time.monotonic() - acked) * 1000:.0f} ms"
            ctx.note(f"registration acknowledged by {registrar[0].name}, in {other.name}'s memory {coherence} "
                     "later (its knock_stored_registrations, polled)")
        await c.enable_push(COMPONENT, node, secret)
        await ctx.go_offline(c)
        if ctx.kind == "ejabberd":
            # ... and a publish that ejabberd hands to the other one is answered `result` and pushed
            other_name = (b if registrar[0] is a else a).name
            for i in range(SPREAD_TRIES):
                if await one_more(ctx, pk, user, node, token, f"s19-spread-{i}") == other_name:
                    ctx.note(f"a publish for the registration made via {registrar[0].name} reached {other_name} "
                             f"at message {i + 1}: answered result, pushed")
                    break
            else:
                raise Failure(f"ejabberd gave none of {SPREAD_TRIES} publishes to {other_name}")

        # the second registration: acknowledged right before the kill
        user2, token2 = "g19", new_token()
        c2 = await ctx.login(user2)
        node2, secret2 = await register(c2, token2)
        await c2.enable_push(COMPONENT, node2, secret2)
        await ctx.go_offline(c2)
        rows = await pk.pg.count()
        check(rows == 2, f"PostgreSQL holds {rows} registration(s) before the kill, expected 2")

        # 2. The burst, and kill -9 of the serving knock (on ejabberd: of the first) in its middle.
        bob = await ctx.sender()
        victim, survivor = (a, b)
        before = len(bed.apns.requests(token))
        since = time.monotonic()
        sent = []
        for i in range(KILL_AT):
            await ctx.send(user, text_for(f"s19-{i}"))
            sent.append(time.monotonic())
            await asyncio.sleep(BURST_PAUSE)
        t_kill = time.monotonic()
        await victim.knock.stop(sig=signal.SIGKILL)

        async def rest():
            for i in range(KILL_AT, BURST):
                await ctx.send(user, text_for(f"s19-{i}"))
                sent.append(time.monotonic())
                await asyncio.sleep(BURST_PAUSE)
        sending = asyncio.create_task(rest())
        try:
            answered = await first_answer_after(bob, t_kill, TAKEOVER_BOUND)
        finally:
            await sending
        up = survivor.relay.up_at()
        check(up is not None, f"{survivor.name} answered, but its link is not up")
        t_serving = t_kill + answered
        handshake = max(up - t_kill, 0.0)
        link = (f"its link up {handshake:.3f} s after (handshake)" if ctx.kind == "prosody"
                else "its link up all along (active/active)")
        ctx.note(f"kill -9 of {victim.name} after message {KILL_AT} of {BURST}: {survivor.name} answered a "
                 f"disco#info {answered:.3f} s after, {link}")
        check(answered < TAKEOVER_BOUND, f"{survivor.name} answered only {answered:.2f} s after the kill")

        # 3. Every message sent after the survivor serves was published to it, answered `result`, pushed.
        pubs = await pk.settle(node, since)
        after = [t for t in sent if t > t_serving]
        gap = [t for t in sent if t_kill <= t <= t_serving]
        by = {k.name: [p for p, kk in pubs if kk is k] for k in pk.knocks}
        surv = [p for p in by[survivor.name] if p.at >= t_kill]
        if surv:
            ctx.note(f"{survivor.name}'s first answer to a publish after the kill: {surv[0].reply_at - t_kill:.3f} s")
        lost = [p for p in by[victim.name] if not p.reply]
        replies = [p.reply for p, _ in pubs]
        results = replies.count("result")
        bad = [r for r in replies if r and r != "result"]
        await asyncio.sleep(0.7)
        pushes = len(bed.apns.requests(token)) - before
        ctx.note(f"burst: {len(sent)} messages; {len(pubs)} publishes reached a knock ({len(by[victim.name])} "
                 f"{victim.name}, {len(by[survivor.name])} {survivor.name}), {results} answered result, "
                 f"{len(lost)} sent to the killed knock unanswered, other replies {bad}; {pushes} pushes; "
                 f"{len(gap)} message(s) sent between the kill and the survivor serving, {len(after)} after")
        check(not [r for r in bad if r.startswith("error:cancel") or r.startswith("error:auth")
                   or r.startswith("error:modify")], f"publishes answered with errors that cost push: {bad}")
        check(len(surv) >= len(after), f"{len(after)} messages sent after {survivor.name} served, but it got only "
                                        f"{len(surv)} publishes")
        check(all(p.reply == "result" for p in surv), f"{survivor.name} answered {[p.reply for p in surv]}")
        check(pushes >= results, f"{results} publishes answered result but only {pushes} pushes")
        check(pushes >= len(after), f"{len(after)} messages after the takeover, {pushes} pushes")
        if ctx.kind == "prosody" and len(pubs) < len(sent):
            # the messages that reached no knock: Prosody answered their publishes itself (wait, not counted)
            bounced = len(re.findall(r"Got error <wait:remote-server-timeout", ctx.server_log().since(mark)))
            ctx.note(f"{len(sent) - len(pubs)} message(s) reached no knock; Prosody answered {bounced} publish(es) "
                     "itself with wait/remote-server-timeout (component not connected: not counted, push lost)")

        # 4. Nothing lost: both registrations push through the survivor without registering again, the rows are
        # in PostgreSQL, and the server still has the user's push enabled.
        await no_disable(ctx, mark, "during the failover")
        rows = await pk.pg.count()
        check(rows == 2, f"PostgreSQL holds {rows} registration(s) after the kill, expected 2")
        check(await one_more(ctx, pk, user, node, token, "s19-after") == survivor.name, "served by the dead knock")
        await one_more(ctx, pk, user2, node2, token2, "s19-last-registered")
        await no_disable(ctx, mark, "after the failover")
        pk.check_logs()
        ctx.summary = (f"survivor serving {answered:.2f} s after kill -9"
                       + (f" (handshake {handshake:.2f} s)" if ctx.kind == "prosody" else "") + f"; {len(after)} "
                       f"messages after it, {pushes} pushes for {results} results, registrations kept (2 rows)"
                       + (f"; coherence {coherence}" if coherence else ""))
    finally:
        await pk.close()


# ------------------------------------------------------------------------------------------------ 20

async def postgres_restart(ctx: Ctx):
    """A steady message flow; PostgreSQL killed (-9) and started again a few seconds later; knock goes on."""
    bed = ctx.bed
    pk = PgKnocks(ctx, "20")
    try:
        await pk.start(1)
        k = pk.knocks[0]
        pid = k.knock.proc.pid
        mark = ctx.server_log().size()
        user, token = "f20", new_token()
        c = await ctx.login(user)
        node, secret = await register(c, token)
        await c.enable_push(COMPONENT, node, secret)
        await ctx.go_offline(c)
        c_down = await ctx.login("h20")  # registers while the database is down
        c_new = await ctx.login("g20")  # registers as soon as it is back
        token_down, token_new = new_token(), new_token()

        before = len(bed.apns.requests(token))
        since = time.monotonic()
        sent = []
        flowing = True

        async def flow():
            i = 0
            while flowing:
                await ctx.send(user, text_for(f"s20-{i}"))
                sent.append(time.monotonic())
                i += 1
                await asyncio.sleep(FLOW_PAUSE)
        sender = asyncio.create_task(flow())
        try:
            await asyncio.sleep(FLOW_LEAD)
            t_down = time.monotonic()
            await pk.pg.ctl("kill9")
            # a registration while the database is away: acknowledged only after a commit, so `wait`
            t_reg = time.monotonic()
            try:
                await register(c_down, token_down)
                reg = "result"
            except StepFailed as e:
                reg = error_of(e)
            reg_took = time.monotonic() - t_reg
            await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - t_down)))
            t_start = time.monotonic()
            await pk.pg.ctl("start")
            t_up = time.monotonic()
            # recovery without restarting knock: a new registration, tried until it is acknowledged
            tries = []
            while True:
                try:
                    node2, secret2 = await register(c_new, token_new)
                    break
                except StepFailed as e:
                    tries.append(error_of(e))
                    if time.monotonic() - t_up > RECOVERY_BOUND:
                        raise Failure(f"registrations still refused {RECOVERY_BOUND:g} s after PostgreSQL was "
                                      f"back: {tries}")
                    await asyncio.sleep(0.1)
            recovered = time.monotonic() - t_up
            await asyncio.sleep(FLOW_TAIL)
        finally:
            flowing = False
            await sender
        ctx.note(f"PostgreSQL killed (-9) {FLOW_LEAD:g} s into a flow of a message every {FLOW_PAUSE:g} s, started "
                 f"again after {t_start - t_down:.1f} s (ready {t_up - t_start:.1f} s later)")
        ctx.note(f"registration while the database was down: answered {reg} after {reg_took:.2f} s")
        ctx.note(f"a new registration once it was back: acknowledged {recovered:.2f} s after the database was "
                 f"ready ({len(tries)} answered {sorted(set(tries))} before)")

        # 1. The flow: no item-not-found, and what knock answered during the outage.
        pubs = await pk.settle(node, since)
        replies = [p.reply for p, _ in pubs]
        during = [p.reply for p, _ in pubs if t_down <= p.at <= t_up]
        await asyncio.sleep(0.7)
        pushes = len(bed.apns.requests(token)) - before
        counts = {r: replies.count(r) for r in sorted(set(replies))}
        ctx.note(f"flow: {len(sent)} messages, {len(pubs)} publishes {counts}; during the outage "
                 f"{len(during)} publishes: {during.count('result')} result (pushed from memory), "
                 f"{sum(1 for r in during if r.startswith('error:wait'))} wait; {pushes} pushes")
        check(not [r for r in replies if "item-not-found" in r], f"publishes answered item-not-found: {counts}")
        check(all(r == "result" or r.startswith("error:wait") for r in replies),
              f"publishes answered other than result or wait: {counts}")
        check(len(pubs) >= len(sent), f"{len(sent)} messages but {len(pubs)} publishes")
        check(pushes >= replies.count("result"), f"{replies.count('result')} results, {pushes} pushes")
        check(reg.startswith("wait/"), f"a registration while PostgreSQL was down was answered {reg}, "
                                       "expected a wait error")
        await no_disable(ctx, mark, "during the database outage")

        # 2. After: knock never restarted; the new registration and the one from before push; both rows are there.
        check(k.knock.alive() and k.knock.proc.pid == pid, "knock exited or was restarted")
        await c_new.enable_push(COMPONENT, node2, secret2)
        await ctx.go_offline(c_new)
        await one_more(ctx, pk, "g20", node2, token_new, "s20-new")
        await one_more(ctx, pk, user, node, token, "s20-old")
        rows = await pk.pg.count()
        # knock applies a change to memory at once and queues it for the database, so the registration answered
        # `wait` may be written once the database is back (told, not asserted: the device's retry gets the same
        # node and secret; one that never retries leaves a row nobody enables)
        check(rows in (2, 3), f"PostgreSQL holds {rows} registration(s), expected 2 (3 with the one answered wait)")
        ctx.note(f"{rows} rows afterwards: the registration answered {reg} during the outage "
                 f"{'was written once the database was back' if rows == 3 else 'was not written'}")
        await no_disable(ctx, mark, "after the database outage")
        pk.check_logs()
        ctx.summary = (f"DB down {t_start - t_down:.1f} s: {len(during)} publishes meanwhile, "
                       f"{during.count('result')} pushed from memory, none item-not-found; a registration meanwhile "
                       f"{reg}; a new one acknowledged {recovered:.2f} s after the DB was back, knock not restarted")
    finally:
        await pk.close()


SCENARIOS = [("19-failover-postgres", failover_postgres), ("20-postgres-restart", postgres_restart)]
SERVERS: dict[str, set[str]] = {}
USERS = {"19-failover-postgres": ["f19", "g19"], "20-postgres-restart": ["f20", "g20", "h20"]}
