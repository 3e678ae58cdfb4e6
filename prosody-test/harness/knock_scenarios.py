"""Knock tokens (issue 21, ChatSecure Push's "Level 1"), against Prosody and ejabberd: the owner's ad-hoc commands
(`knock-token-create`, `-list`, `-revoke`, `-rotate`) and the knock itself, sent by another user of the same server
(bob) to knock's component JID, routed there by the server.

What knock must do is its handler, src/handlers/knock.rs (the spec): a knock with a live token is pushed as an
important publish of the token's registration (APNs under `auto`: alert, priority 10; FCM: HIGH) with one key
more, `knock` = the token's 16-hex-digit id (top level of the APNs payload, in FCM's `data`), and answered with an
empty `result`; an unknown, revoked, expired or rotated-out token is `cancel/item-not-found`, all alike; a token
past its hourly rate `wait/resource-constraint`; a malformed knock `modify/bad-request`. Neither the token nor the
knocker's JID reaches the push service, knock's log or its store.

No client sends these yet: the commands are run as a generic XEP-0050 client does (a submitted XEP-0004 form with
the fields the handler reads), the knock as `<iq type='set' to='push.localhost'><knock xmlns='knock:token:0'
token='...'/></iq>`. A knock that pushed has already pushed when it is answered (knock answers after the push
service did), so the mock's count is checked at the answer, not after a quiet second.

Each scenario has its own owner (k21, k22, k23), so one scenario's tokens and registrations (and their hourly
caps: registrations_per_user_per_hour, and knock tokens' own creation cap) never affect another's.
"""

import asyncio
import base64
import calendar
import json
import os
import re
import secrets
import time
import xml.etree.ElementTree as ET

from bed import AUTO_ALERT_TITLE, COMPONENT, DOMAIN, FCM_APP, TOPIC
from client import CommandError, StepFailed
from scenarios import XDATA, Ctx, Failure, check, need_app, new_token
from slixmpp.exceptions import IqError, IqTimeout
import android_scenarios

NS_KNOCK = "knock:token:0"
NS_COMMANDS = "{http://jabber.org/protocol/commands}"
CREATE, LIST, REVOKE, ROTATE = "knock-token-create", "knock-token-list", "knock-token-revoke", "knock-token-rotate"
# the handler's defaults (src/handlers/knock.rs)
DEFAULT_DAYS, DEFAULT_PER_HOUR, DEFAULT_GRACE_HOURS = 90, 6, 72
LIST_COLUMNS = ["id", "node", "expires", "per-hour", "uses", "replaced-until"]
# the time the expiry-seconds token is given: the shortest knock allows
SHORT_SECS = 10
# what a `result` knock's push may take at most (the mock records it before knock answers)
ANSWERED_PUSH_WAIT = 2.0
NOT_FOUND = "error:cancel:item-not-found"
LIMITED = "error:wait:resource-constraint"
BAD_REQUEST = "error:modify:bad-request"


# ------------------------------------------------------------------------------------------------ helpers

def xep0082(text: str) -> float:
    """A XEP-0082 UTC time (`2026-12-04T11:49:51Z`) as Unix seconds."""
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, TypeError):
        raise Failure(f"{text!r} is not a XEP-0082 UTC time")


async def command(c, node: str, fields: dict[str, str] | None = None, timeout: float = 10.0) -> ET.Element:
    """Execute the knock-token command `node` in one step, with a submitted form of `fields` (None: no form, as
    `knock-token-list` is run); the completed <command/> (CommandError on an error reply)."""
    payload = None
    if fields is not None:
        payload = c["xep_0004"].make_form(ftype="submit")
        for var, value in fields.items():
            payload.add_field(var=var, value=value)
    try:
        return (await c.completed(COMPONENT, node, payload, timeout)).xml
    except CommandError:
        raise
    except StepFailed as e:
        raise Failure(str(e))


async def refused(c, node: str, fields: dict[str, str] | None) -> str:
    """The error a command is answered with, as `error:<type>:<condition>` (a Failure if it completed)."""
    try:
        await command(c, node, fields)
    except CommandError as e:
        return f"error:{e.etype}:{e.condition}"
    raise Failure(f"{node} with {fields} completed, expected an error")


def result_form(cmd: ET.Element, what: str) -> dict[str, str]:
    x = cmd.find(f"{XDATA}x")
    check(x is not None and x.get("type") == "result", f"{what}: no result form in the reply")
    return {f.get("var", ""): (f.findtext(f"{XDATA}value") or "") for f in x.findall(f"{XDATA}field")}


class Token:
    """A token as its owner got it from create or rotate: the secret (shown once) and its public id."""

    def __init__(self, form: dict[str, str], raw_form: ET.Element):
        self.value = form.get("token", "")
        self.id = form.get("id", "")
        self.form = form
        self.raw = raw_form

    def __repr__(self):
        return f"<token {self.id}>"


async def create(ctx: Ctx, c, fields: dict[str, str], node: str, per_hour: int = DEFAULT_PER_HOUR,
                 lifetime: float = DEFAULT_DAYS * 86400, op: str = CREATE) -> Token:
    """Run create (or rotate) and check the result form: a 43-character URL-safe token of 256 bits as a
    text-private field, a 16-hex-digit id, the registration's node, the expiry and the rate asked for."""
    asked = time.time()
    try:
        cmd = await command(c, op, fields)
    except CommandError as e:
        raise Failure(f"{e} (fields {fields})")
    form = result_form(cmd, op)
    t = Token(form, cmd)
    check(re.fullmatch(r"[A-Za-z0-9_-]{43}", t.value),
          f"{op}: token {len(t.value)} characters long, expected 43 of URL-safe base64")
    check(len(base64.urlsafe_b64decode(t.value + "=")) == 32, f"{op}: the token is not 256 bits")
    field = cmd.find(f"{XDATA}x/{XDATA}field[@var='token']")
    check(field.get("type") == "text-private",
          f"{op}: the token field is {field.get('type')!r}, expected text-private (a client hides it)")
    check(re.fullmatch(r"[0-9a-f]{16}", t.id), f"{op}: id {t.id!r}, expected 16 lower-case hex digits")
    check(form.get("node") == node, f"{op}: node {form.get('node')!r}, expected the registration's")
    expires = xep0082(form.get("expires"))
    check(asked + lifetime - 3 <= expires <= time.time() + lifetime + 1,
          f"{op}: expires {form.get('expires')}, expected {lifetime:g} s from now")
    check(form.get("per-hour") == str(per_hour), f"{op}: per-hour {form.get('per-hour')!r}, expected {per_hour}")
    t.expires = expires
    ctx.tokens.append(t)
    return t


async def listing(c) -> dict[str, dict[str, str]]:
    """`knock-token-list` run without a form; its XEP-0004 multi-item result as {id: {column: value}}."""
    cmd = await command(c, LIST)
    x = cmd.find(f"{XDATA}x")
    check(x is not None and x.get("type") == "result", f"{LIST}: no result form in the reply")
    columns = [f.get("var") for f in x.findall(f"{XDATA}reported/{XDATA}field")]
    check(columns == LIST_COLUMNS, f"{LIST}: columns {columns}, expected {LIST_COLUMNS}")
    rows = {}
    for item in x.findall(f"{XDATA}item"):
        row = {f.get("var", ""): (f.findtext(f"{XDATA}value") or "") for f in item.findall(f"{XDATA}field")}
        check(sorted(row) == sorted(LIST_COLUMNS), f"{LIST}: a row has {sorted(row)}, expected every column")
        rows[row["id"]] = row
    return rows


async def knock(ctx: Ctx, token: str | None, bob=None) -> str:
    """bob knocks, as a client sends it: `result` or `error:<type>:<condition>`."""
    bob = bob or await ctx.sender()
    iq = bob.Iq()
    iq["type"] = "set"
    iq["to"] = COMPONENT
    el = ET.Element(f"{{{NS_KNOCK}}}knock")
    if token is not None:
        el.set("token", token)
    iq.append(el)
    try:
        reply = await iq.send(timeout=10)
    except IqError as e:
        check(e.iq["from"] == COMPONENT, f"a knock was answered by {e.iq['from']}, not by knock: {e.iq}")
        return f"error:{e.iq['error']['type']}:{e.iq['error']['condition']}"
    except IqTimeout:
        raise Failure("no answer to a knock within 10 s")
    check(reply["from"] == COMPONENT, f"a knock was answered by {reply['from']}, not by knock")
    check(len(reply.xml) == 0, f"a knock's result is not empty: {reply}")
    return "result"


async def expect_knock(ctx: Ctx, token: str | None, expected: str, what: str):
    got = await knock(ctx, token)
    check(got == expected, f"{what}: knock answered {got}, expected {expected}")


async def pushes(mock, device: str, count: int) -> list[dict]:
    """The mock's requests for `device`, once it has `count` of them (at most ANSWERED_PUSH_WAIT later)."""
    reqs = await mock.wait_requests(device, count, ANSWERED_PUSH_WAIT)
    check(len(reqs) == count, f"{mock.label} got {len(reqs)} request(s) for the device, expected {count}")
    return reqs


def no_leaks(req: dict, leaks: list[str], what: str):
    """Nothing of `leaks` anywhere in a request as the mock recorded it (headers, path, body, fields)."""
    everything = json.dumps(req)
    for leak in leaks:
        check(leak not in everything, f"{what}: the push carries {leak[:20]!r}...: {everything[:400]}")


def check_apns_knock(r: dict, node: str, token: Token, leaks: list[str], what: str):
    """An APNs push for a knock: as an important publish of an `auto` app (alert, 10, mutable-content, the app's
    title), with `knock` = the id at the top level; no token, no knocker."""
    check(r["status"] == 200, f"{what}: mock APNs answered {r['status']} {r.get('reason')}")
    check((r["push_type"], r["priority"]) == ("alert", "10"),
          f"{what}: apns-push-type {r['push_type']!r} / priority {r['priority']!r}, expected alert / 10")
    check(r["topic"] == TOPIC, f"{what}: apns-topic {r['topic']!r}, expected {TOPIC!r}")
    try:
        p = json.loads(r.get("body", ""))
    except ValueError:
        raise Failure(f"{what}: APNs payload is not JSON: {r.get('body')!r}")
    check(p.get("knock") == token.id, f"{what}: payload knock {p.get('knock')!r}, expected the id {token.id}")
    aps = p.get("aps", {})
    alert = aps.get("alert")
    title = alert.get("title") if isinstance(alert, dict) else alert
    check(aps.get("mutable-content") == 1 and title == AUTO_ALERT_TITLE,
          f"{what}: aps {aps}, expected the auto app's alert ({AUTO_ALERT_TITLE!r}) with mutable-content")
    check(set(p) <= {"aps", "knock", "node"}, f"{what}: payload has unexpected keys {sorted(p)}")
    check(p.get("node", node) == node, f"{what}: payload node is not the registration's")
    no_leaks(r, [token.value] + leaks, what)


def everything_secret(ctx: Ctx) -> list[str]:
    """Every form of every token this scenario made: as handed out, its bytes, their hex and std base64."""
    out = []
    for t in ctx.tokens:
        raw = base64.urlsafe_b64decode(t.value + "=")
        out += [t.value, raw.hex(), base64.b64encode(raw).decode().rstrip("=")]
    return out


def check_quiet(ctx: Ctx, mark: int, leaks: list[str]):
    """knock's log (knock=debug, bed.py) since `mark` and every file of its store hold none of the tokens (in
    any form) and none of `leaks` (the knocker's and owner's JIDs); the tokens are checked in the whole log."""
    bed = ctx.bed
    log = bed.knock_log_since(0)
    recent = bed.knock_log_since(mark)
    # knock runs with KNOCK_LOG=info,knock=debug here (bed.py): the check means something only at debug
    check(re.search(r" DEBUG knock::", recent), "knock's log has no debug line from this scenario: is knock=debug "
                                                "still set?")
    for t in everything_secret(ctx):
        check(t not in log, f"knock's log (knock=debug) holds a knock token: {t[:12]}...")
    for leak in leaks:
        check(leak not in recent, f"knock's log (knock=debug) holds {leak!r}")
    raws = [base64.urlsafe_b64decode(t.value + "=") for t in ctx.tokens]
    needles = [s.encode() for s in everything_secret(ctx) + leaks] + raws
    files = 0
    for root, _, names in os.walk(bed.knock.store):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            files += 1
            for n in needles:
                check(n not in data, f"knock's store file {os.path.relpath(path, bed.knock.dir)} holds "
                                     f"{n[:12]!r}... (a token, its bytes, or a JID)")
    check(files, f"knock's store {bed.knock.store} has no files: nothing was checked")
    return files


def knocks_came_from_bob(ctx: Ctx, since: float, bob) -> list:
    """The knocks knock was handed since `since` (the wiretap), each from bob's full JID: the server routed them
    and told knock who knocked, so what knock keeps of it is knock's choice."""
    seen = ctx.bed.tap.knocks_since(since)
    check(seen, "the wiretap saw no knock reach knock: the server did not route them to the component")
    full = str(bob.boundjid)
    check(all(k.sender == full for k in seen), f"knocks reached knock from {sorted({k.sender for k in seen})}, "
                                               f"expected bob's full JID {full}")
    return seen


async def owner(ctx: Ctx, user: str):
    """`user` logged in with an iOS device registered with knock's `auto` app (register-push-apns): (client,
    device token, node)."""
    need_app(ctx, "auto")
    ctx.tokens = []
    c = await ctx.login(user)
    device = new_token()
    jid, node, secret = await c.register_device(COMPONENT, "phone", device, app="auto")
    check(jid == COMPONENT and node and secret, f"register-push-apns (app auto) gave jid={jid!r}, empty node/secret")
    return c, device, node


# ------------------------------------------------------------------------------------------------ 21

async def knock_token(ctx: Ctx):
    """Alice (k21) creates a knock token for her iOS device and one for her Android device; bob knocks through the
    server with each: `result`, exactly one push to her device, as an important publish of hers (APNs alert/10,
    FCM HIGH) with `knock` = the token's id, and neither the token nor bob's JID in it. An unknown token is
    item-not-found, and so is the Android token once that device unregistered; a knock without a token is
    bad-request; none of those pushes. knock's log and store hold no token and no knocker."""
    user = "k21"
    t0 = time.monotonic()
    mark = ctx.bed.knock_log_size()
    c, device, node = await owner(ctx, user)
    bob = await ctx.sender()
    _, features = await bob.disco_info(COMPONENT)
    check(NS_KNOCK in features, f"knock's disco#info lacks {NS_KNOCK}: {sorted(features)}")
    leaks = [f"bob@{DOMAIN}", str(bob.boundjid), f"{user}@{DOMAIN}"]

    # iOS: her one registration, so create needs no node
    t = await create(ctx, c, {}, node)
    await expect_knock(ctx, t.value, "result", "bob's knock with alice's token")
    r = (await pushes(ctx.bed.apns, device, 1))[0]
    check_apns_knock(r, node, t, leaks, "the knock's APNs push")

    # Android (Conversations' own registration): with two registrations, create must be told which
    need_app(ctx, FCM_APP)
    aid, fcm_device = android_scenarios.android_id(), android_scenarios.fcm_token()
    _, fcm_node, _ = await android_scenarios.register(c, fcm_device, aid)
    got = await refused(c, CREATE, {})
    check(got == BAD_REQUEST, f"{CREATE} without a node for an owner of two registrations: {got}, expected "
                              f"{BAD_REQUEST}")
    ta = await create(ctx, c, {"node": fcm_node}, fcm_node)
    check(ta.id != t.id, "two tokens got the same id")
    await expect_knock(ctx, ta.value, "result", "bob's knock with alice's Android token")
    r = (await pushes(ctx.bed.fcm, fcm_device, 1))[0]
    what = "the knock's FCM message"
    check(r["status"] == 200, f"{what}: mock FCM answered {r['status']} {r.get('error_code') or ''}")
    check(r.get("priority") == "HIGH", f"{what}: android.priority {r.get('priority')!r}, expected HIGH")
    account = android_scenarios.account_of(user, aid)
    check(r.get("data") == {"account": account, "knock": ta.id},
          f"{what}: data {r.get('data')}, expected exactly the registration's account and knock = {ta.id}")
    check(not r.get("android_data"), f"{what}: android.data {r.get('android_data')} would override data")
    no_leaks(r, [ta.value, t.value] + leaks, what)
    check(len(ctx.bed.apns.requests(device)) == 1, "the Android token's knock pushed the iOS device too")

    # a token never outlives its registration: Conversations unregisters, its token is item-not-found
    await android_scenarios.unregister(c, aid)
    await expect_knock(ctx, ta.value, NOT_FOUND, "a knock with the token of a registration since unregistered")
    rows = await listing(c)
    check(ta.id not in rows and t.id in rows,
          f"after unregister-push-fcm, {LIST} shows {sorted(rows)}: expected the iOS token only ({t.id})")
    got = await refused(c, CREATE, {"node": fcm_node})
    check(got == NOT_FOUND, f"{CREATE} for the unregistered node: {got}, expected {NOT_FOUND}")

    # what is not a token
    await expect_knock(ctx, secrets.token_urlsafe(32), NOT_FOUND, "a knock with an unknown 43-character token")
    await expect_knock(ctx, t.value[:42], NOT_FOUND, "a knock with a token cut short")
    await expect_knock(ctx, None, BAD_REQUEST, "a knock without a token attribute")
    await asyncio.sleep(0.5)
    check(len(ctx.bed.apns.requests(device)) == 1 and len(ctx.bed.fcm.requests(fcm_device)) == 1,
          "a refused knock pushed")

    seen = knocks_came_from_bob(ctx, t0, bob)
    files = check_quiet(ctx, mark, leaks)
    ctx.note(f"{len(seen)} knocks reached knock from {seen[0].sender}; APNs {{knock: {t.id}}} alert/10, FCM "
             f"data.knock HIGH; {files} store files and knock's log hold no token and no JID")
    ctx.summary = ("knock -> result, one push with the token's id (APNs alert/10, FCM HIGH), no token or JID in it; "
                   "unregistered, unknown -> item-not-found, no token -> bad-request; log and store clean")


# ------------------------------------------------------------------------------------------------ 22

async def knock_token_rate_revoke(ctx: Ctx):
    """A token with per-hour 2: bob's third knock is wait/resource-constraint and does not push. The listing counts
    the knocks that pushed. A token revoked by id is item-not-found at once, and gone from the listing; `all`
    revokes the rest."""
    user = "k22"
    mark = ctx.bed.knock_log_size()
    apns = ctx.bed.apns
    c, device, node = await owner(ctx, user)
    bob = await ctx.sender()
    leaks = [f"bob@{DOMAIN}", str(bob.boundjid), f"{user}@{DOMAIN}"]

    for bad in ({"per-hour": "0"}, {"per-hour": "61"}, {"expiry-days": "366"}):
        got = await refused(c, CREATE, bad)
        check(got == BAD_REQUEST, f"{CREATE} with {bad}: {got}, expected {BAD_REQUEST}")
    rate = await create(ctx, c, {"node": node, "per-hour": "2"}, node, per_hour=2)
    got = [await knock(ctx, rate.value) for _ in range(3)]
    check(got == ["result", "result", LIMITED], f"three knocks with a per-hour 2 token: {got}, expected "
                                                f"['result', 'result', '{LIMITED}']")
    reqs = await pushes(apns, device, 2)
    for i, r in enumerate(reqs):
        check_apns_knock(r, node, rate, leaks, f"knock {i + 1} of the per-hour 2 token")

    kept = await create(ctx, c, {"expiry-days": "30"}, node, lifetime=30 * 86400)
    gone = await create(ctx, c, {"node": node}, node)
    await expect_knock(ctx, kept.value, "result", "a knock with a fresh token")
    rows = await listing(c)
    check(sorted(rows) == sorted([rate.id, kept.id, gone.id]),
          f"{LIST} shows {sorted(rows)}, expected the three tokens {sorted([rate.id, kept.id, gone.id])}")
    for t, uses in ((rate, 2), (kept, 1), (gone, 0)):
        row = rows[t.id]
        want = {"id": t.id, "node": node, "expires": t.form["expires"], "per-hour": t.form["per-hour"],
                "uses": str(uses), "replaced-until": ""}
        check(row == want, f"{LIST}: row {row}, expected {want}")

    cmd = await command(c, REVOKE, {"id": gone.id})
    note = cmd.findtext(f"{NS_COMMANDS}note") or ""
    check("1" in note, f"{REVOKE}: note {note!r}, expected it to say one token was revoked")
    await expect_knock(ctx, gone.value, NOT_FOUND, "a knock with the revoked token")
    got = await refused(c, REVOKE, {"id": gone.id})
    check(got == NOT_FOUND, f"revoking the revoked token again: {got}, expected {NOT_FOUND}")
    rows = await listing(c)
    check(sorted(rows) == sorted([rate.id, kept.id]),
          f"after revoking {gone.id}, {LIST} shows {sorted(rows)}, expected {sorted([rate.id, kept.id])}")

    cmd = await command(c, REVOKE, {"all": "true"})
    note = cmd.findtext(f"{NS_COMMANDS}note") or ""
    check("2" in note, f"{REVOKE} all: note {note!r}, expected it to say two tokens were revoked")
    await expect_knock(ctx, kept.value, NOT_FOUND, "a knock after revoke all")
    rows = await listing(c)
    check(not rows, f"after revoke all, {LIST} still shows {sorted(rows)}")
    await asyncio.sleep(0.5)
    n = len(apns.requests(device))
    check(n == 3, f"APNs got {n} request(s) for the device, expected 3 (two knocks of the rate-limited token, "
                  "one of the fresh one; none for the refused ones)")
    check_quiet(ctx, mark, leaks)
    ctx.summary = ("per-hour 2: result, result, wait/resource-constraint, 2 pushes; list counts uses; revoked -> "
                   "item-not-found at once; all revoked, list empty")


# ------------------------------------------------------------------------------------------------ 23

async def knock_token_expiry_rotate(ctx: Ctx):
    """A token made with expiry-seconds 10 knocks at once and is item-not-found (and off the listing) once the
    10 s are up; meanwhile: rotating with grace-hours 0 kills the old token at once and the new one pushes with
    its own id; rotating with the default grace keeps both working, the old one listed with replaced-until."""
    user = "k23"
    mark = ctx.bed.knock_log_size()
    apns = ctx.bed.apns
    c, device, node = await owner(ctx, user)
    bob = await ctx.sender()
    leaks = [f"bob@{DOMAIN}", str(bob.boundjid), f"{user}@{DOMAIN}"]
    pushed = 0

    async def knocks_and_pushes(t: Token, what: str):
        nonlocal pushed
        await expect_knock(ctx, t.value, "result", what)
        pushed += 1
        check_apns_knock((await pushes(apns, device, pushed))[-1], node, t, leaks, what)

    for bad in ({"expiry-seconds": str(SHORT_SECS - 1)}, {"expiry-seconds": "60", "expiry-days": "1"}):
        got = await refused(c, CREATE, bad)
        check(got == BAD_REQUEST, f"{CREATE} with {bad}: {got}, expected {BAD_REQUEST}")
    short = await create(ctx, c, {"expiry-seconds": str(SHORT_SECS)}, node, lifetime=SHORT_SECS)
    await knocks_and_pushes(short, f"a knock with the {SHORT_SECS} s token at once")

    # rotation, while the short token runs out
    first = await create(ctx, c, {}, node)
    at_once = await create(ctx, c, {"id": first.id, "grace-hours": "0"}, node, op=ROTATE)
    check(at_once.form.get("replaces") == first.id, f"{ROTATE}: replaces {at_once.form.get('replaces')!r}, "
                                                    f"expected {first.id}")
    await expect_knock(ctx, first.value, NOT_FOUND, "a knock with a token rotated with grace-hours 0")
    await knocks_and_pushes(at_once, "a knock with its successor")
    graced = await create(ctx, c, {"id": at_once.id}, node, op=ROTATE)
    until = xep0082(graced.form.get("replaced-until"))
    check(graced.form.get("replaces") == at_once.id and abs(until - (time.time() + DEFAULT_GRACE_HOURS * 3600)) < 5,
          f"{ROTATE} with the default grace: replaces {graced.form.get('replaces')!r}, replaced-until "
          f"{graced.form.get('replaced-until')!r}; expected {at_once.id} and {DEFAULT_GRACE_HOURS} h from now")
    await knocks_and_pushes(at_once, "a knock with a token in its grace period")
    await knocks_and_pushes(graced, "a knock with the token that replaces it")
    got = await refused(c, ROTATE, {"id": at_once.id})
    check(got == BAD_REQUEST, f"rotating a token rotated already: {got}, expected {BAD_REQUEST}")
    rows = await listing(c)
    check(rows.get(at_once.id, {}).get("replaced-until") == graced.form.get("replaced-until"),
          f"{LIST}: the rotated token's row is {rows.get(at_once.id)}, expected replaced-until "
          f"{graced.form.get('replaced-until')}")
    check(rows.get(graced.id, {}).get("replaced-until") == "" and first.id not in rows,
          f"{LIST}: {rows}, expected the successor without replaced-until and no row for {first.id}")
    check(short.id in rows or time.time() >= short.expires, f"{LIST}: the {SHORT_SECS} s token is missing early")

    # the short token's time is up
    left = short.expires + 1 - time.time()
    if left > 0:
        await asyncio.sleep(left)
    await expect_knock(ctx, short.value, NOT_FOUND, f"a knock with the {SHORT_SECS} s token after its expiry")
    rows = await listing(c)
    check(short.id not in rows, f"{LIST} still shows the expired token: {rows.get(short.id)}")
    check(sorted(rows) == sorted([at_once.id, graced.id]),
          f"{LIST} shows {sorted(rows)}, expected the rotated token and its successor")
    await asyncio.sleep(0.5)
    n = len(apns.requests(device))
    check(n == pushed, f"APNs got {n} request(s) for the device, expected {pushed}")
    check_quiet(ctx, mark, leaks)
    ctx.summary = (f"expiry-seconds {SHORT_SECS}: pushed, then item-not-found; rotate grace 0: old item-not-found, "
                   "new pushes its own id; default grace: both push, replaced-until listed")


SCENARIOS = [
    ("21-knock-token", knock_token),
    ("22-knock-token-rate-revoke", knock_token_rate_revoke),
    ("23-knock-token-expiry-rotate", knock_token_expiry_rotate),
]
# all run against both servers
SERVERS: dict[str, set[str]] = {}
USERS = {"21-knock-token": ["k21"], "22-knock-token-rate-revoke": ["k22"], "23-knock-token-expiry-rotate": ["k23"]}
