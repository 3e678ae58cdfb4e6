"""Scenarios for the Conversations family on Android (Conversations, Snikket Android, Quicksy, forks) over FCM HTTP
v1 (issue 19), against Prosody and ejabberd: p2's dialect (`register-push-fcm`), knock's `conversations` app (an
FCM app, bed.py), and testkit's mock FCM, which checks knock's OAuth grants and message shape as Google does.

Every stanza the client sends is replayed as Conversations sends it; where it comes from is cited at each one
(the facts are collected in /work/notes/fcm.md on the machine these were written on). What knock must send to FCM
is the contract in /work/notes/fcm-spec.md: a data-only message `{"account": sha1(bare JID + NUL + android-id)}`
(what Conversations' receiver compares), priority HIGH for what the server marks important, NORMAL otherwise.
"""

import asyncio
import hashlib
import secrets
import time
import xml.etree.ElementTree as ET

from bed import COMPONENT, DOMAIN, FCM_APP, FCM_PROJECT
from client import CommandError
from procs import wait_for
from scenarios import (PUSH_WAIT, RECEIPT, WAIT_KEPT_LOG, Ctx, Failure, check, first_match, need_app, no_leaks,
                       one_publish, send_stanza, server_log_wait, spend_dead_budget, summary_fields, text_for)

REGISTER_FCM = "register-push-fcm"
UNREGISTER_FCM = "unregister-push-fcm"
# knock's android.ttl when the app sets no expiration_secs: four weeks, Google's own maximum and default
FCM_TTL = "2419200s"
# knock's publish deadline (limits.publish_deadline_ms, default 10 s): how long it may retry FCM before answering
PUBLISH_DEADLINE = 10.0

# Conversations' registration (IqGenerator.pushTokenToAppServer, snikket-im/snikket-android
# src/main/java/eu/siacs/conversations/generator/IqGenerator.java): ad-hoc `register-push-fcm`, action execute,
# a form made by its Data class: `put("token")`, `put("android-id")`, then `submit()`, which sets type='submit'
# and leaves each field with its var and <value> only: no FORM_TYPE, no field types, no sessionid, one stage.
# The android-id is Settings.Secure.ANDROID_ID (PhoneHelper.getAndroidId): 16 lower-case hex digits.
CONVERSATIONS_REGISTER = (
    "<x xmlns='jabber:x:data' type='submit'>"
    "<field var='token'><value>{token}</value></field>"
    "<field var='android-id'><value>{android_id}</value></field>"
    "</x>"
)
# Unregistering (IqGenerator.unregisterChannelOnAppServer, without a channel: the account's own registration):
# `unregister-push-fcm` with the android-id.
CONVERSATIONS_UNREGISTER = (
    "<x xmlns='jabber:x:data' type='submit'>"
    "<field var='android-id'><value>{android_id}</value></field>"
    "</x>"
)
# Conversations' <enable/> (IqGenerator.enablePush): Data.setFormType(PUBSUB_PUBLISH_OPTIONS), which is a plain
# put("FORM_TYPE", ...) (no type='hidden'), then put("secret"), then submit().
CONVERSATIONS_ENABLE = (
    "<enable xmlns='urn:xmpp:push:0' jid='{jid}' node='{node}'>"
    "<x xmlns='jabber:x:data' type='submit'>"
    "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
    "<field var='secret'><value>{secret}</value></field>"
    "</x></enable>"
)


# ------------------------------------------------------------------------------------------------ helpers

def fcm_token() -> str:
    """An FCM registration token of the shape Google hands out (instance id, ':APA91b', ~140 more characters of
    URL-safe base64): what goes into `register-push-fcm`'s token field."""
    return f"{secrets.token_urlsafe(16)[:22]}:APA91b{secrets.token_urlsafe(104)}"


def android_id() -> str:
    return secrets.token_hex(8)


def account_of(user: str, aid: str) -> str:
    """What Conversations compares `data.account` with (CryptoHelper.getAccountFingerprint): lower-case hex
    SHA-1 of the bare JID, a NUL, and the android-id; p2's Utils.combineAndHash makes the same."""
    return hashlib.sha1(f"{user}@{DOMAIN}\0{aid}".encode()).hexdigest()


async def register(c, token: str, aid: str) -> tuple[str, str, str]:
    """`register-push-fcm` exactly as Conversations sends it; (jid, node, secret) as it reads them back
    (PushManagementService: the values of the command's form, nothing else)."""
    try:
        values = await c.execute(COMPONENT, REGISTER_FCM,
                                 ET.fromstring(CONVERSATIONS_REGISTER.format(token=token, android_id=aid)))
    except CommandError as e:
        raise Failure(str(e))
    got = {k: (values.get(k) or [""])[0] for k in ("jid", "node", "secret")}
    check(all(got.values()), f"{REGISTER_FCM}'s reply lacks jid, node or secret: {values}")
    check(got["jid"] == COMPONENT, f"{REGISTER_FCM} returned jid {got['jid']!r}, expected {COMPONENT!r}")
    return got["jid"], got["node"], got["secret"]


async def unregister(c, aid: str):
    try:
        await c.execute(COMPONENT, UNREGISTER_FCM, ET.fromstring(CONVERSATIONS_UNREGISTER.format(android_id=aid)))
    except CommandError as e:
        raise Failure(str(e))


async def enable(c, node: str, secret: str):
    await c.send_iq_set(CONVERSATIONS_ENABLE.format(jid=COMPONENT, node=node, secret=secret),
                        "Conversations' <enable/>")


async def conversations_device(ctx: Ctx, user: str, token: str, aid: str):
    """Log in, register with knock and enable push at the server, as Conversations does at each login."""
    need_app(ctx, FCM_APP)
    c = await ctx.login(user)
    _, node, secret = await register(c, token, aid)
    await enable(c, node, secret)
    return c, node, secret


def is_collapse_key_of(key, node: str) -> bool:
    """A collapse key per node that does not show the node: a prefix of at least 16 hex digits of sha256(node)
    (fcm-spec.md says 16; knock sends the 32 of its APNs collapse ids, the first 16 bytes)."""
    return isinstance(key, str) and len(key) >= 16 and hashlib.sha256(node.encode()).hexdigest().startswith(key)


def check_message(r: dict, priority: str, account: str, node: str, leaks: list[str], what: str):
    """One FCM send as Conversations needs it: delivered (200) over HTTP/2 to this project, data-only with
    exactly `account`, the priority, a collapse key per node, knock's TTL; nothing of `leaks` in it."""
    check(r["status"] == 200, f"{what}: mock FCM answered {r['status']} {r.get('error_code') or ''} "
                              f"{r.get('error_message') or ''}")
    check(r.get("project") == FCM_PROJECT, f"{what}: sent to project {r.get('project')!r}, expected {FCM_PROJECT!r}")
    check(r.get("version") == "HTTP/2.0", f"{what}: sent over {r.get('version')}, expected HTTP/2")
    check(not r.get("validate_only"), f"{what}: validate_only set (a dry run, never delivered)")
    check(r.get("priority") == priority, f"{what}: android.priority {r.get('priority')!r}, expected {priority!r}")
    check(r.get("data") == {"account": account},
          f"{what}: data {r.get('data')}, expected exactly {{'account': sha1(JID NUL android-id) = {account!r}}}")
    check(not r.get("android_data"), f"{what}: android.data {r.get('android_data')} would override data")
    check(is_collapse_key_of(r.get("collapse_key"), node),
          f"{what}: collapse_key {r.get('collapse_key')!r}, expected a hex prefix (16 digits or more) of sha256(node)")
    check(r.get("ttl") == FCM_TTL, f"{what}: android.ttl {r.get('ttl')!r}, expected {FCM_TTL!r}")
    no_leaks(r, leaks, "FCM")


async def fcm_sends(ctx: Ctx, token: str, before: int, count: int = 1) -> list[dict]:
    return await ctx.expect_pushes(token, before, count, mock=ctx.bed.fcm)


async def no_fcm_send(ctx: Ctx, token: str, before: int, why: str):
    await asyncio.sleep(0.7)
    reqs = ctx.bed.fcm.requests(token)
    check(len(reqs) == before, f"{why}, yet FCM got {len(reqs) - before} request(s) for the token: "
                               f"{[(r['status'], r.get('priority')) for r in reqs[before:]]}")


def granted(ctx: Ctx) -> list[dict]:
    """The access tokens the mock granted knock (JWT-bearer grants answered 200)."""
    return [t for t in ctx.bed.fcm.token_requests() if t.get("status") == 200]


# ------------------------------------------------------------------------------------------------ 15

async def conversations(ctx: Ctx):
    """Conversations end to end: register-push-fcm (jid/node/secret; again with the same android-id and with a
    refreshed token: the same node and secret), its <enable/>; a chat message -> exactly one data-only HIGH
    message with Conversations' `account` and no content; a receipt -> NORMAL; access tokens expired at the mock
    mid-run -> the next message is still pushed, after a second grant; unregister-push-fcm -> item-not-found."""
    user, aid = "c15", android_id()
    old_token, token = fcm_token(), fcm_token()
    account = account_of(user, aid)
    fcm = ctx.bed.fcm
    need_app(ctx, FCM_APP)
    c = await ctx.login(user)
    _, node, secret = await register(c, old_token, aid)
    check(await register(c, old_token, aid) == (COMPONENT, node, secret),
          "registering again with the same android-id and token changed the node or secret")
    # FirebaseMessagingService.onNewToken: Conversations registers the new token with the same android-id
    check(await register(c, token, aid) == (COMPONENT, node, secret),
          "registering a refreshed token with the same android-id changed the node or secret (the server's "
          "<enable/> would no longer match)")
    await enable(c, node, secret)
    await ctx.go_offline(c)
    leaks = [f"{user}@{DOMAIN}", f"bob@{DOMAIN}", f"@{DOMAIN}", "New Message!", "New message", secret, node, aid,
             "confidential"]

    # 1. a chat message: important (the server's summary has its placeholder last-message-body) -> HIGH
    texts = [text_for("s15-chat")]
    text = texts[0]
    since = time.monotonic()
    await ctx.send(user, text)
    pub = await one_publish(ctx, node, since)
    check(summary_fields(pub).get("last-message-body"),
          f"the server did not mark the chat message important (summary {summary_fields(pub)})")
    check(pub.reply == "result", f"knock answered the chat message's publish with {pub.reply}")
    r = (await fcm_sends(ctx, token, 0, 1))[0]
    check_message(r, "HIGH", account, node, leaks + [text], "chat message")
    check(not fcm.requests(old_token), "the token the device replaced was pushed too")
    grants = granted(ctx)
    check(len(grants) == 1 and r.get("access_token") == grants[0].get("access_token"),
          f"expected the send to carry the one access token granted so far; {len(grants)} grant(s)")
    ctx.note(f"chat message: HIGH, data.account = {account[:12]}..., collapse_key {r['collapse_key']}, ttl {r['ttl']}")

    # 2. a receipt: nothing to show (no last-message-body) -> NORMAL
    since = time.monotonic()
    await send_stanza(ctx, user, RECEIPT.format(id=f"r15-{secrets.token_hex(3)}"))
    pub = await one_publish(ctx, node, since)
    check(not summary_fields(pub).get("last-message-body"),
          f"the server marked a body-less receipt important (summary {summary_fields(pub)}); this bed needs an "
          "unimportant publish")
    check(pub.reply == "result", f"knock answered the receipt's publish with {pub.reply}")
    r = (await fcm_sends(ctx, token, 1, 1))[0]
    check_message(r, "NORMAL", account, node, leaks, "receipt")

    # 3. the mock expires every access token it issued: knock's cached one now gets 401; it must fetch a new one
    #    and send again, so the message is not lost
    fcm.expire_tokens()
    text = text_for("s15-expired")
    texts.append(text)
    since = time.monotonic()
    await ctx.send(user, text)
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "result", f"after the access token expired knock answered {pub.reply}")
    try:
        await wait_for_delivered(ctx, token, 3)
    except TimeoutError:
        pass  # said below, with what FCM saw
    await asyncio.sleep(0.7)
    new = fcm.requests(token)[2:]
    statuses = [x["status"] for x in new]
    delivered = [x for x in new if x["status"] == 200]
    check(len(delivered) == 1, f"after the access token expired FCM got {statuses} for the message, expected "
                               "exactly one 200 (no push lost, none twice)")
    check(set(statuses) <= {200, 401} and statuses.count(401) <= 1,
          f"after the access token expired: {statuses}, expected at most one 401 before the 200")
    check_message(delivered[0], "HIGH", account, node, leaks + [text], "message after the token expiry")
    grants = granted(ctx)
    check(len(grants) == 2, f"the mock granted {len(grants)} access token(s) in all, expected a second one after "
                            "the expiry")
    check(delivered[0].get("access_token") == grants[1].get("access_token"),
          "the message after the expiry was not sent with the newly granted access token")
    ctx.note(f"access tokens expired at the mock: FCM saw {statuses}, a second grant, the message delivered")

    # 4. unregister-push-fcm: the server's next publish is answered item-not-found, nothing sent
    c = await ctx.login(user)
    await unregister(c, aid)
    await ctx.go_offline(c)
    before = len(fcm.requests(token))
    since = time.monotonic()
    await ctx.send(user, text_for("s15-after"))
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "error:cancel:item-not-found",
          f"after {UNREGISTER_FCM} knock answered {pub.reply}, expected cancel/item-not-found")
    await no_fcm_send(ctx, token, before, f"the device ran {UNREGISTER_FCM}")

    log = ctx.bed.knock_log_since(0)
    for leak in (token, old_token, secret, node, aid, account, f"{user}@{DOMAIN}", *texts):
        check(leak not in log, f"knock's log (knock=debug) contains a token, secret, node, android-id, account "
                               f"hash, JID or text: {leak[:40]!r}")
    ctx.summary = ("same node/secret on re-registration; chat HIGH, receipt NORMAL, data = {account} only; "
                   "token expiry: 401, new grant, delivered; unregistered -> item-not-found")


async def wait_for_delivered(ctx: Ctx, token: str, count: int):
    """Until the mock FCM has answered 200 to `count` sends for `token` (TimeoutError after PUSH_WAIT)."""
    await wait_for(lambda: len([r for r in ctx.bed.fcm.requests(token) if r["status"] == 200]) >= count,
                   PUSH_WAIT, f"{count} delivered FCM message(s)")


# ------------------------------------------------------------------------------------------------ 16

async def conversations_dead_token(ctx: Ctx):
    """FCM says UNREGISTERED (the app was uninstalled): knock answers item-not-found and deletes the registration;
    the server disables push (ejabberd at once, Prosody after its error budget) and knock sends FCM nothing more;
    registering again gives a new node, and with its <enable/> pushes work again."""
    user, aid, token = "c16", android_id(), fcm_token()
    fcm = ctx.bed.fcm
    c, node, secret = await conversations_device(ctx, user, token, aid)
    fcm.behave(token, "unregistered")
    await ctx.go_offline(c)
    knock_mark = ctx.bed.knock_log_size()
    mark = ctx.server_log().size()
    since = time.monotonic()
    texts = [text_for("s16-1")]
    await ctx.send(user, texts[0])
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "error:cancel:item-not-found",
          f"knock answered the publish FCM called UNREGISTERED with {pub.reply}, expected cancel/item-not-found")
    reqs = fcm.requests(token)
    check([(r["status"], r.get("error_code")) for r in reqs] == [(404, "UNREGISTERED")],
          f"expected one 404 UNREGISTERED from FCM, got {[(r['status'], r.get('error_code')) for r in reqs]}")
    check("registration deleted" in ctx.bed.knock_log_since(knock_mark),
          "knock did not log that it deleted the registration")

    after = await spend_dead_budget(ctx, user, node, since, texts, mark, "s16")
    n = len(fcm.requests(token))
    check(n == 1, f"knock sent {n - 1} FCM request(s) for the token after its UNREGISTERED")

    # Conversations registers again at its next login (a new token after a reinstall): the registration is gone,
    # so this is a new one, with a new node; the app's <enable/> with it makes the server push again.
    fcm.clear_behaviour(token)
    token2 = fcm_token()
    c, node2, secret2 = await conversations_device(ctx, user, token2, aid)
    check(node2 != node, "registering again after the dead token gave the old node back: the registration "
                         "FCM called dead was not deleted")
    await ctx.go_offline(c)
    since = time.monotonic()
    await ctx.send(user, text_for("s16-again"))
    pub = await one_publish(ctx, node2, since)
    check(pub.reply == "result", f"after registering and enabling again knock answered {pub.reply}")
    r = (await fcm_sends(ctx, token2, 0, 1))[0]
    check_message(r, "HIGH", account_of(user, aid), node2, [secret2, node2], "message after re-registering")
    check(len(fcm.requests(token)) == 1, "the dead token was pushed again")
    ctx.summary = (f"item-not-found, registration deleted; {len(after)} more publish(es) until {ctx.kind} "
                   "disabled push, no FCM request; a new registration pushes")


# ------------------------------------------------------------------------------------------------ 17

async def conversations_fcm_outage(ctx: Ctx):
    """FCM fails for a moment (two INTERNAL, then OK): knock retries inside the publish deadline, one message
    delivered, `result`. FCM down for longer than the deadline (UNAVAILABLE throughout): knock answers `wait`,
    the server keeps the registration, and once FCM is back the next message is pushed."""
    user, aid, token = "c17", android_id(), fcm_token()
    fcm = ctx.bed.fcm
    account = account_of(user, aid)
    c, node, secret = await conversations_device(ctx, user, token, aid)
    await ctx.go_offline(c)

    # a blip: retried, delivered once
    fcm.behave(token, "fail-times:2:internal")
    since = time.monotonic()
    await ctx.send(user, text_for("s17-blip"))
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "result", f"FCM failed twice then recovered, yet knock answered {pub.reply}")
    await wait_for_delivered(ctx, token, 1)
    await asyncio.sleep(0.7)
    blip = [r["status"] for r in fcm.requests(token)]
    check(blip == [500, 500, 200], f"FCM saw {blip} for one message, expected [500, 500, 200] (retried until "
                                   "delivered, once)")
    ctx.note(f"INTERNAL twice: knock retried, FCM saw {blip}, answered result in {pub.reply_at - pub.at:.2f} s")

    # an outage longer than the deadline
    fcm.behave(token, "unavailable")
    before = len(fcm.requests(token))
    mark = ctx.server_log().size()
    since = time.monotonic()
    await ctx.send(user, text_for("s17-outage"))
    pub = await one_publish(ctx, node, since, timeout=PUBLISH_DEADLINE + 10)
    check(pub.reply and pub.reply.startswith("error:wait:"),
          f"knock answered a publish during an FCM outage with {pub.reply}, expected a wait error")
    attempts = fcm.requests(token)[before:]
    check(attempts and all(r["status"] == 503 for r in attempts),
          f"expected only 503s from FCM during the outage, got {[r['status'] for r in attempts]}")
    took = pub.reply_at - pub.at
    outage_reply = pub.reply
    check(took <= PUBLISH_DEADLINE + 2, f"knock took {took:.1f} s to answer, past its {PUBLISH_DEADLINE:g} s deadline")
    ctx.note(f"UNAVAILABLE throughout: knock answered {pub.reply} after {len(attempts)} FCM attempt(s) in {took:.2f} s")
    log = await server_log_wait(ctx, mark, WAIT_KEPT_LOG[ctx.kind], 5)
    ctx.note(f"server log: {first_match(log, WAIT_KEPT_LOG[ctx.kind])}")

    # FCM is back: the registration was kept, the next message is pushed
    fcm.clear_behaviour(token)
    before = len(fcm.requests(token))
    text = text_for("s17-after")
    since = time.monotonic()
    await ctx.send(user, text)
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "result", f"after FCM recovered knock answered {pub.reply}")
    r = (await fcm_sends(ctx, token, before, 1))[0]
    check_message(r, "HIGH", account, node, [text, secret, node, aid], "message after the outage")
    ctx.summary = (f"blip retried and delivered once; outage -> {outage_reply} after {len(attempts)} attempt(s) "
                   f"in {took:.1f} s, registration kept, pushed after recovery")


SCENARIOS = [
    ("15-conversations", conversations),
    ("16-conversations-dead-token", conversations_dead_token),
    ("17-conversations-fcm-outage", conversations_fcm_outage),
]
# all run against both servers
SERVERS: dict[str, set[str]] = {}
USERS = {"15-conversations": ["c15"], "16-conversations-dead-token": ["c16"],
         "17-conversations-fcm-outage": ["c17"]}
