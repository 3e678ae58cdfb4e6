"""The test bed for one XMPP server: the server, a mock APNs, a mock FCM, knock, and the wiretap between knock and
the server.

All on 127.0.0.1, all files under one run directory, ports picked at run time.
"""

import asyncio
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from client import Client
from procs import LogWatch, Proc, Registry, free_port, port_listening, tail, wait_for
from wiretap import Wiretap

COMPONENT = "push.localhost"
DOMAIN = "localhost"
TOPIC = "im.knock.prosodytest"
# The iOS dialects' apps (issue 17), each with its own bundle id so a push shows which app knock chose.
MONAL_TOPIC = "im.knock.monaltest"
SISKIN_TOPIC = "im.knock.siskintest"
SISKIN_VOIP_TOPIC = SISKIN_TOPIC + ".voip"  # knock's default voip_topic: the bundle id + ".voip", as Apple names it
MOCK_TOPICS = [TOPIC, MONAL_TOPIC, SISKIN_TOPIC, SISKIN_VOIP_TOPIC]
AUTO_ALERT_TITLE = "PT new message"
MONAL_MODULE = "monalProdiOS"
SISKIN_PROVIDER = "tigase:messenger:apns:1"
# The Conversations family's app (Android, FCM HTTP v1) and the Firebase project the mock FCM serves.
FCM_APP = "conversations"
FCM_PROJECT = "knock-prosodytest"
TEAM_ID = "TEAMPT1234"
KEY_ID = "KEYPT12345"
PASSWORD = "pw-" + secrets.token_hex(6)
# Prosody counts non-`wait` errors per registration and disables it after this many in a row (default 16).
# Small here so the dead-token scenario is quick; PT_PUSH_MAX_ERRORS=16 checks Prosody's default instead.
PUSH_MAX_ERRORS = int(os.environ.get("PT_PUSH_MAX_ERRORS", "3"))
# Debian trixie's mod_cloud_notify_encrypted, _priority_tag and _filters, unpacked by lib/trixie-modules.sh
# (the encrypted one with its one-name fix for Prosody 0.12); `run` exports where.
TRIXIE_PLUGINS = os.environ.get("PT_TRIXIE_PLUGINS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "trixie-modules", "plugins")
TRIXIE_MODULES = ["cloud_notify_encrypted", "cloud_notify_priority_tag", "cloud_notify_filters"]


def say(msg: str):
    """Progress and observations go to stderr; stdout carries only the PASS/FAIL lines and the total."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass  # nobody is reading any more; keep going (and cleaning up)


class MockPush:
    """One of testkit's mock push services (mock-apns, mock-fcm) as a process: both print a `listening` JSON
    line first, then one per request, and take per-token behaviours on a loopback control listener. Tokens go
    into its URLs as they are (the mocks do not percent-decode): hex for APNs, [A-Za-z0-9_:-] for FCM."""

    name = "?"
    label = "?"  # in failure messages: "APNs request(s)"

    def __init__(self, registry: Registry, bin_path: str, run_dir: str, args: list[str]):
        self.dir = run_dir
        self.requests_file = os.path.join(run_dir, f"{self.name}.jsonl")
        self.log_file = os.path.join(run_dir, f"{self.name}.log")
        self.proc = Proc(registry, self.name, [bin_path, "--listen", "127.0.0.1:0", *args,
                                               "--control", "127.0.0.1:0"],
                         self.log_file, stdout_path=self.requests_file)
        self.url = None
        self.control = None
        self.listening: dict = {}

    async def ready(self, timeout=15):
        def first_line():
            if not self.proc.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode()}):\n{tail(self.log_file)}")
            try:
                with open(self.requests_file) as f:
                    line = f.readline()
            except OSError:
                return None
            if line.endswith("\n"):
                return json.loads(line)
            return None
        event = await wait_for(first_line, timeout, f"{self.name} to listen")
        assert event.get("event") == "listening", event
        self.listening = event
        self.url = event["url"]
        self.control = event["control"]

    def _call(self, method, path):
        req = urllib.request.Request(self.control + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read()

    def behave(self, token: str, name: str):
        self._call("POST", f"/behaviour/{token}/{name}")

    def clear_behaviour(self, token: str):
        self._call("DELETE", f"/behaviour/{token}")

    def default(self, name: str):
        self._call("POST", f"/default/{name}")

    def requests(self, token: str | None = None) -> list[dict]:
        return json.loads(self._call("GET", f"/requests/{token}" if token else "/requests"))

    async def wait_requests(self, token: str, count: int, timeout: float) -> list[dict]:
        try:
            return await wait_for(lambda: (lambda r: r if len(r) >= count else None)(self.requests(token)),
                                  timeout, f"{count} {self.name} request(s)", interval=0.05)
        except TimeoutError:
            return self.requests(token)

    async def stop(self):
        await self.proc.stop()


class MockApns(MockPush):
    name = "mock-apns"
    label = "APNs"

    def __init__(self, registry: Registry, bin_path: str, run_dir: str):
        self.key_file = os.path.join(run_dir, "AuthKey_mock.p8")
        self.ca_file = os.path.join(run_dir, "mock-apns-ca.pem")
        super().__init__(registry, bin_path, run_dir, [
            "--team-id", TEAM_ID, "--key-id", KEY_ID, "--private-key-out", self.key_file,
            *[a for t in MOCK_TOPICS for a in ("--topic", t)], "--ca-out", self.ca_file])


class MockFcm(MockPush):
    """Google's FCM HTTP v1 API and its OAuth token endpoint: it writes a service-account key file whose
    token_uri points at itself, verifies knock's JWT grants against it, and checks the message shape."""

    name = "mock-fcm"
    label = "FCM"

    def __init__(self, registry: Registry, bin_path: str, run_dir: str):
        self.service_account_file = os.path.join(run_dir, "fcm-service-account.json")
        self.ca_file = os.path.join(run_dir, "mock-fcm-ca.pem")
        super().__init__(registry, bin_path, run_dir, [
            "--project", FCM_PROJECT, "--service-account-out", self.service_account_file,
            "--ca-out", self.ca_file])

    def expire_tokens(self):
        """Every access token issued so far expires now: knock's next send gets 401."""
        self._call("POST", "/expire-tokens")

    def token_requests(self) -> list[dict]:
        """Every token request (JWT-bearer grant) the mock answered, in order."""
        return json.loads(self._call("GET", "/token-requests"))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


class Knock:
    def __init__(self, registry: Registry, bin_path: str, run_dir: str, component_port: int, secret: str,
                 apns: MockApns, wipe_store: bool = False):
        self.registry = registry
        self.wipe_store = wipe_store
        self.store = os.path.join(run_dir, "store")
        self.bin = bin_path
        self.dir = run_dir
        self.component_port = component_port
        self.secret = secret
        self.apns = apns
        os.makedirs(run_dir, exist_ok=True)
        self.config = os.path.join(run_dir, "knock.toml")
        self.log_file = os.path.join(run_dir, "knock.log")
        self.apps: list[dict] = []
        # the [store] table's lines other than key_file: sled in its directory unless a scenario says otherwise
        # (scenarios 19-20: `engine = "postgres"`, the URL and a password file)
        self.store_toml = 'path = "store"'
        # app name -> why this knock build refused it (`knock check`), for the scenarios that need it
        self.refused: dict[str, str] = {}
        # tokens sealed at rest, as an admin following the README runs knock
        key_file = os.path.join(run_dir, "store.key")
        if not os.path.exists(key_file):
            subprocess.run([bin_path, "keygen", "--out", key_file], check=True, stdout=subprocess.DEVNULL)
        self.proc = None

    def write_config(self, apps: list[dict]):
        parts = [f"""# knock under test (written by prosody-test)
[component]
jid = "{COMPONENT}"
server = "127.0.0.1:{self.component_port}"
secret = "{self.secret}"
# a standby (scenarios 18-19, Prosody) knocks again every 250 ms: takeover well inside the 2 s the tests allow
standby_retry_ms = 250

[store]
{self.store_toml}
key_file = "store.key"

[limits]
# no coalescing: every message in a scenario is its own push
push_interval_ms = 0
"""]
        for app in apps:
            comment = app.get("#")
            lines = [f"# {comment}"] if comment else []
            lines.append("[[app]]")
            # an app is APNs unless it says otherwise; an FCM app's credentials are its service_account_file
            provider = app.get("provider", "apns")
            lines.append(f"provider = {toml_value(provider)}")
            lines += [f"{k} = {toml_value(v)}" for k, v in app.items()
                      if k not in ("#", "provider") and v is not None]
            if provider == "apns":
                lines += ["", "[app.auth]", f"key_file = {toml_value(self.apns.key_file)}",
                          f'key_id = "{KEY_ID}"', f'team_id = "{TEAM_ID}"']
            parts.append("\n".join(lines) + "\n")
        with open(self.config, "w") as f:
            f.write("\n".join(parts))
        self.apps = apps

    def check(self) -> str | None:
        """`knock check` on the written config: None if it is accepted, else what knock said."""
        r = subprocess.run([self.bin, "check", "--config", self.config], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)
        return None if r.returncode == 0 else (r.stderr or r.stdout).strip()

    def configure(self, base: list[dict], optional: list[dict]):
        """The config with the `base` apps and every `optional` app this knock build accepts. The optional
        apps use settings knock is gaining (issue 17); one it refuses is left out, with knock's reason kept
        in `refused`, so the scenarios that need it fail saying so while the others still run."""
        self.refused = {}
        self.write_config(base)
        why = self.check()
        if why:
            raise RuntimeError(f"knock check refused the base config: {why}")
        kept = []
        for app in optional:
            self.write_config(base + kept + [app])
            why = self.check()
            if why:
                self.refused[app["name"]] = why.replace("\n", " | ")[:400]
                say(f"knock check refused app {app['name']!r} (its scenarios will fail): {self.refused[app['name']]}")
            else:
                kept.append(app)
        self.write_config(base + kept)

    def app_missing(self, name: str) -> str | None:
        """Why the app `name` is not in the running config, or None if it is."""
        if any(a["name"] == name for a in self.apps):
            return None
        return f"this knock build refuses the {name!r} app's config: {self.refused.get(name, '(not configured)')}"

    def start(self):
        if self.wipe_store:  # sabotage: a knock that forgets its registrations on restart
            shutil.rmtree(self.store, ignore_errors=True)
        with open(self.log_file, "a") as f:
            f.write(f"===== prosody-test: starting knock at {time.strftime('%H:%M:%S')}\n")
        self.proc = Proc(self.registry, "knock", [self.bin, "run", "--config", self.config], self.log_file,
                         env={"KNOCK_LOG": "info,knock=debug", "NO_COLOR": "1"})

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def link_up_in_log(self) -> bool:
        """Whether knock's newest log section (since its last start) says the link is up."""
        text = LogWatch(self.log_file).since(0)
        section = text[max(text.rfind("===== prosody-test: starting knock"), 0):]
        lost = section.rfind("component link lost")
        return "component link up" in (section[lost:] if lost >= 0 else section)

    async def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc is None:
            return None
        rc = await self.proc.stop(timeout=timeout, sig=sig)
        self.proc = None
        return rc


class Server:
    """What the scenarios need from an XMPP server."""

    name = "?"
    log_file = ""

    def __init__(self, registry: Registry, run_dir: str, component_secret: str, c2s_port: int = 0,
                 component_port: int = 0):
        self.registry = registry
        self.dir = run_dir
        self.component_secret = component_secret
        self.c2s_port = c2s_port or free_port()
        self.component_port = component_port or free_port()
        self.proc = None

    def alive(self):
        return self.proc is not None and self.proc.alive()

    async def ready(self, timeout: float):
        def up():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode()}):\n{tail(self.log_file)}")
            return port_listening(self.c2s_port) and port_listening(self.component_port)
        await wait_for(up, timeout, f"{self.name} to listen", interval=0.1)

    def log(self) -> LogWatch:
        return LogWatch(self.log_file)


class Prosody(Server):
    name = "prosody"

    def __init__(self, registry, run_dir, component_secret, **ports):
        super().__init__(registry, run_dir, component_secret, **ports)
        self.config = os.path.join(run_dir, "prosody.cfg.lua")
        self.log_file = os.path.join(run_dir, "prosody-debug.log")
        self.out_file = os.path.join(run_dir, "prosody.out")
        os.makedirs(os.path.join(run_dir, "data"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "certs"), exist_ok=True)
        for m in TRIXIE_MODULES:
            if not os.path.exists(os.path.join(TRIXIE_PLUGINS, f"mod_{m}", f"mod_{m}.lua")):
                raise RuntimeError(f"mod_{m} missing from {TRIXIE_PLUGINS}: lib/setup.sh fetches trixie's "
                                   "prosody-modules (run prosody-test/run, not harness/main.py directly)")
        trixie = "".join(f'\t"{m}";\n' for m in TRIXIE_MODULES)
        with open(self.config, "w") as f:
            f.write(f"""-- Prosody for knock's end-to-end tests (written by prosody-test). Loopback only, no TLS.
run_as_root = true
pidfile = "{run_dir}/prosody.pid"
data_path = "{run_dir}/data"
certificates = "{run_dir}/certs"

log = {{
	{{ levels = {{ min = "info" }}, to = "console" }};
	{{ levels = {{ min = "debug" }}, to = "file", filename = "{self.log_file}" }};
}}

interfaces = {{ "127.0.0.1" }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
component_interfaces = {{ "127.0.0.1" }}
component_ports = {{ {self.component_port} }}

c2s_require_encryption = false
s2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
storage = "internal"

-- trixie's cloud_notify extensions (the Tigase push dialect: encrypted payloads, priority, filters), loaded
-- for every scenario beside bookworm's mod_cloud_notify; they change nothing unless a client's <enable/>
-- asks for them. Only these three are in this path (prosody-test/lib/trixie-modules.sh).
plugin_paths = {{ "{TRIXIE_PLUGINS}" }}

modules_enabled = {{
	"roster"; "saslauth"; "disco"; "carbons"; "smacks"; "offline"; "ping";
	"presence"; "message"; "iq";
	"cloud_notify";
{trixie}}}
modules_disabled = {{ "s2s" }}

push_notification_with_body = false
push_notification_with_sender = false
-- default 16; small so the dead-token scenario needs only a few messages
push_max_errors = {PUSH_MAX_ERRORS}

VirtualHost "{DOMAIN}"

Component "{COMPONENT}"
	component_secret = "{component_secret}"
""")

    def start(self):
        self.proc = Proc(self.registry, "prosody", ["prosody", "-F", "--config", self.config], self.out_file)

    async def ready(self, timeout: float):
        await super().ready(timeout)
        # a module that fails to load is only logged; these tests must not run without the trixie ones
        log = self.log().since(0)
        bad = re.findall(r"(?:Unable to load module|Error initializing module) '[^']*'.*", log)
        if bad:
            raise RuntimeError(f"prosody could not load a module: {bad[0][:300]}")

    async def stop(self):
        if self.proc is not None:
            await self.proc.stop(timeout=15)
            self.proc = None

    async def add_users(self, users: list[str], password: str):
        for u in users:
            r = await asyncio.to_thread(
                subprocess.run,
                ["prosodyctl", "--config", self.config, "register", u, DOMAIN, password],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"prosodyctl register {u} failed: {r.stdout}{r.stderr}")


class Ejabberd(Server):
    name = "ejabberd"

    def __init__(self, registry, run_dir, component_secret, **ports):
        super().__init__(registry, run_dir, component_secret, **ports)
        self.dist_port = free_port()
        self.node = f"knocktest{secrets.token_hex(3)}@localhost"
        self.spool = os.path.join(run_dir, "spool")
        self.logs = os.path.join(run_dir, "logs")
        self.log_file = os.path.join(self.logs, "ejabberd.log")
        self.out_file = os.path.join(run_dir, "ejabberd.out")
        self.pid_file = os.path.join(run_dir, "ejabberd.pid")
        os.makedirs(self.spool, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        with open(os.path.join(run_dir, "ejabberd.yml"), "w") as f:
            f.write(f"""# ejabberd for knock's end-to-end tests (written by prosody-test). Loopback only, no TLS.
hosts:
  - {DOMAIN}
loglevel: info
log_rotate_count: 0
acme:
  auto: false
certfiles: []
listen:
  -
    port: {self.c2s_port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: none
    access: c2s
    starttls: false
    starttls_required: false
  -
    port: {self.component_port}
    ip: "127.0.0.1"
    module: ejabberd_service
    shaper: none
    hosts:
      "{COMPONENT}":
        password: "{component_secret}"
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
auth_method: internal
auth_password_format: scram
shaper_rules:
  c2s_shaper: none
  s2s_shaper: none
modules:
  mod_disco: {{}}
  mod_roster: {{}}
  mod_offline: {{}}
  mod_carboncopy: {{}}
  mod_client_state: {{}}
  mod_ping: {{}}
  mod_stream_mgmt: {{}}
  mod_push:
    include_body: "New message"
    include_sender: false
  mod_push_keepalive: {{}}
""")
        with open(os.path.join(run_dir, "ejabberdctl.cfg"), "w") as f:
            f.write(f"""# sourced by ejabberdctl (--config-dir)
ERLANG_NODE={self.node}
# fixed distribution port: no epmd daemon is started (none outlives the test)
ERL_DIST_PORT={self.dist_port}
EJABBERD_PID_PATH={self.pid_file}
# distribution on loopback only; given as a kernel flag rather than INET_DIST_INTERFACE, which costs every
# ejabberdctl call an extra Erlang VM start to parse the address
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0 -kernel inet_dist_use_interface {{127,0,0,1}}"
""")
        with open(os.path.join(run_dir, "inetrc"), "w") as f:
            f.write("%% Erlang resolver config (ejabberdctl points ERL_INETRC here); defaults are fine.\n")
        # ejabberdctl switches to the ejabberd user when run as root: it must own its directory.
        if os.geteuid() == 0:
            pw = pwd.getpwnam("ejabberd")
            for root, dirs, files in os.walk(run_dir):
                os.chown(root, pw.pw_uid, pw.pw_gid)
                for name in files:
                    os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)

    def ctl_argv(self, *args):
        return ["ejabberdctl", "--config-dir", self.dir, "--config", os.path.join(self.dir, "ejabberd.yml"),
                "--spool", self.spool, "--logs", self.logs, *args]

    def start(self):
        self.proc = Proc(self.registry, "ejabberd", self.ctl_argv("foreground"), self.out_file)

    def beam_pid(self):
        try:
            with open(self.pid_file) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    async def stop(self):
        if self.proc is None:
            return
        # The process we started is ejabberdctl (a shell) running su running the Erlang VM: ask the VM to
        # stop (SIGTERM = init:stop in OTP 25), then make sure the whole group is gone.
        beam = self.beam_pid()
        if beam is not None and self.proc.alive():
            try:
                os.kill(beam, signal.SIGTERM)
            except ProcessLookupError:
                pass
            await self.proc.wait_exit(20)
        await self.proc.stop(timeout=5)
        try:
            os.unlink(self.pid_file)
        except OSError:
            pass
        self.proc = None

    async def add_users(self, users: list[str], password: str):
        async def one(u):
            r = await asyncio.to_thread(
                subprocess.run, self.ctl_argv("register", u, DOMAIN, password),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"ejabberdctl register {u} failed: {r.stdout}{r.stderr}")
        # each ejabberdctl call starts an Erlang VM (~1 s): two at a time on two cores
        for i in range(0, len(users), 2):
            await asyncio.gather(*(one(u) for u in users[i:i + 2]))


class Bed:
    """One server with its mock APNs, mock FCM and knock; with `tap`, knock reaches the server through the wiretap."""

    def __init__(self, kind: str, run_dir: str, bins: dict, registry: Registry, tap: bool = True,
                 password: str = PASSWORD, ports: dict | None = None, sabotage: str = "",
                 pin_background: bool = True):
        self.kind = kind
        # Scenarios 1-11 assert silent pushes; the demo shows what a new user's knock does (auto).
        self.pin_background = pin_background
        self.dir = os.path.join(run_dir, kind)
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.bins = bins
        self.registry = registry
        self.use_tap = tap
        self.password = password
        self.sabotage = sabotage
        self.component_secret = secrets.token_hex(16)
        server_dir = os.path.join(self.dir, kind)
        os.makedirs(server_dir, exist_ok=True)
        cls = {"prosody": Prosody, "ejabberd": Ejabberd}[kind]
        self.server: Server = cls(registry, server_dir, self.component_secret, **(ports or {}))
        self.apns = None
        self.fcm = None
        self.knock = None
        self.tap = None
        self.users: list[str] = []

    async def start(self, users: list[str]):
        t0 = time.monotonic()
        component_port = self.server.component_port
        if self.use_tap:
            self.tap = Wiretap(self.server.component_port)
            component_port = await self.tap.start()
        self.apns = MockApns(self.registry, self.bins["mock-apns"], self.dir)
        # mock-fcm first makes the service account's RSA key (4-8 s in a debug build): the server starts and
        # gets its users meanwhile; knock's config needs both mocks' URLs and files
        self.fcm = MockFcm(self.registry, self.bins["mock-fcm"], self.dir)
        self.server.start()

        async def server_up():
            await self.server.ready(60)
            await self.server.add_users(users, self.password)
        await asyncio.gather(self.apns.ready(), self.fcm.ready(timeout=60), server_up())
        self.users = users
        self.knock = Knock(self.registry, self.bins["knock"], os.path.join(self.dir, "knock"),
                           component_port,
                           "wrong-secret" if self.sabotage == "secret" else self.component_secret,
                           self.apns, wipe_store=self.sabotage == "wipe-store")
        self.knock.configure(*self.knock_apps())
        if self.sabotage == "mock-unavailable":
            self.apns.default("unavailable")
            self.fcm.default("unavailable")
        self.knock.start()
        await self.wait_link(15)
        say(f"[{self.kind}] bed up in {time.monotonic() - t0:.1f} s: c2s 127.0.0.1:{self.server.c2s_port}, "
            f"component 127.0.0.1:{self.server.component_port}"
            + (f" (knock via wiretap :{self.tap.listen_port})" if self.tap else "")
            + f", mock APNs {self.apns.url}, mock FCM {self.fcm.url}"
            + (f", SABOTAGED: {self.sabotage}" if self.sabotage else ""))

    def knock_apps(self) -> tuple[list[dict], list[dict]]:
        """knock's apps: (what every knock build takes, what only a build with issue 17's dialects or issue 19's
        FCM provider takes)."""
        url = self.apns.url
        # the same mock under another name: knock's sandbox pushes are told apart by their :authority
        sandbox_url = url.replace("://127.0.0.1:", "://localhost:")
        topic = "im.knock.wrongtopic" if self.sabotage == "topic" else TOPIC
        base = [{
            "#": "knock's own dialect (register-push-apns); the first app, the default for registrations. "
                 + ("Scenarios 1-11 assert silent pushes: push_type pinned to background." if self.pin_background
                    else "push_type left at its default (auto)."),
            "name": "chat", "topic": topic, "endpoint": url, "ca_file": self.apns.ca_file,
            "push_type": "alert" if self.sabotage == "alert" else ("background" if self.pin_background else None),
        }]
        optional = [
            {"#": "knock's own dialect with push_type left at its default (auto): scenario 12",
             "name": "auto", "topic": topic, "endpoint": url, "ca_file": self.apns.ca_file,
             "alert_title": AUTO_ALERT_TITLE},
            {"#": "Monal's registration-free dialect (pushModule in the publish-options, node = token): scenario 13",
             "name": "monal", "topic": "im.knock.wrongtopic" if self.sabotage == "topic" else MONAL_TOPIC,
             "endpoint": url, "ca_file": self.apns.ca_file,
             # sabotage: the sandbox endpoint is the production one (13 must notice)
             "sandbox_endpoint": url if self.sabotage == "sandbox" else sandbox_url,
             "push_module": [MONAL_MODULE]},
            {"#": "the Tigase dialect (Siskin: register-device, encrypted payloads, VoIP): scenario 14",
             "name": "siskin", "topic": "im.knock.wrongtopic" if self.sabotage == "topic" else SISKIN_TOPIC,
             "endpoint": url, "ca_file": self.apns.ca_file, "tigase_provider": [SISKIN_PROVIDER],
             # sabotage: calls to the bundle id instead of its .voip topic (the mock refuses them)
             "voip_topic": SISKIN_TOPIC if self.sabotage == "voip-topic" else None},
            {"#": "Android over FCM HTTP v1: the Conversations family's register-push-fcm (p2's dialect); the "
                  "only FCM app, so the one register-push-fcm picks. Scenarios 15-17",
             "provider": "fcm", "name": FCM_APP, "service_account_file": self.fcm.service_account_file,
             "endpoint": self.fcm.url, "ca_file": self.fcm.ca_file,
             # sabotage: every message NORMAL priority (15 must notice the chat message is not HIGH)
             "push_type": "background" if self.sabotage == "fcm-background" else None},
        ]
        return base, optional

    async def wait_link(self, timeout: float):
        def up():
            if self.knock.proc is not None and not self.knock.alive():
                raise RuntimeError(f"knock exited ({self.knock.proc.returncode()}):\n{tail(self.knock.log_file)}")
            if self.tap is not None:
                return self.tap.link_up()
            return self.knock.link_up_in_log()
        await wait_for(up, timeout, "knock's component link to come up")

    async def ensure_healthy(self):
        """Before each scenario: everything running, the link up, the mock answering ok."""
        if not self.server.alive():
            say(f"[{self.kind}] server was down; starting it")
            self.server.start()
            await self.server.ready(60)
        if not self.knock.alive():
            say(f"[{self.kind}] knock was down; starting it")
            if self.knock.proc is not None:
                await self.knock.stop()
            self.knock.start()
        await self.wait_link(15)
        for mock in (self.apns, self.fcm):
            mock.default("unavailable" if self.sabotage == "mock-unavailable" else "ok")

    def knock_log_size(self) -> int:
        return LogWatch(self.knock.log_file).size()

    def knock_log_since(self, mark: int) -> str:
        return LogWatch(self.knock.log_file).since(mark)

    async def login(self, user: str) -> Client:
        c = Client(f"{user}@{DOMAIN}/phone", self.password)
        return await c.online(self.server.c2s_port)

    async def stop(self):
        errors = []
        for what, fn in (("knock", lambda: self.knock.stop() if self.knock else None),
                         (self.kind, self.server.stop),
                         ("mock-apns", lambda: self.apns.stop() if self.apns else None),
                         ("mock-fcm", lambda: self.fcm.stop() if self.fcm else None)):
            try:
                r = fn()
                if asyncio.iscoroutine(r):
                    await r
            except Exception as e:  # keep stopping the rest
                errors.append(f"{what}: {e}")
        if self.tap:
            await self.tap.close()
        return errors

    def diagnostics(self) -> str:
        parts = [f"--- knock log ({self.knock.log_file if self.knock else '-'})"]
        if self.knock:
            parts.append(tail(self.knock.log_file, 20))
        parts.append(f"--- {self.kind} log ({self.server.log_file})")
        parts.append(tail(self.server.log_file, 20))
        return "\n".join(parts)


def find_bins(repo: str) -> dict:
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(repo, "target"))
    bins = {n: os.path.join(target, "debug", n) for n in ("knock", "mock-apns", "mock-fcm")}
    for n, p in bins.items():
        if not os.access(p, os.X_OK):
            raise SystemExit(f"{p} missing: run `cargo build --workspace --bins` first")
    # testkit's throwaway PostgreSQL (scenarios 19-20); checked by those scenarios, so the rest run without it
    bins["pg-cluster"] = os.path.join(target, "debug", "pg-cluster")
    return bins
