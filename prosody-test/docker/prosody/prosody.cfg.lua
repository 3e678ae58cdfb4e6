-- Prosody for knock's docker test stack (prosody-test/docker-compose.yml). A LOCAL TEST SERVER: no TLS, plain
-- authentication over the unencrypted stream is allowed, and anyone who reaches it may register an account.
-- Published on 127.0.0.1 only.

pidfile = "/var/lib/prosody/prosody.pid"
data_path = "/var/lib/prosody"
log = { { levels = { min = "info" }, to = "console" } }

interfaces = { "*" }
c2s_ports = { 5222 }
c2s_direct_tls_ports = { }
s2s_ports = { }
-- knock connects from its own container: the component port listens on every interface of this container
-- (the compose network only; it is not published)
component_interfaces = { "*" }
component_ports = { 5347 }

c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
storage = "internal"
allow_registration = true

modules_enabled = {
	"roster"; "saslauth"; "disco"; "carbons"; "pep"; "private"; "blocklist"; "vcard_legacy";
	"version"; "uptime"; "time"; "ping"; "register"; "mam"; "csi_simple"; "smacks"; "offline";
	"cloud_notify";   -- XEP-0357, from prosody-modules
}
modules_disabled = { "s2s" }

-- what leaves the server in a push (mod_cloud_notify's defaults, written out): no message text, no sender
push_notification_with_body = false
push_notification_with_sender = false
push_max_errors = 16

VirtualHost "localhost"

-- Component "push.localhost" with its secret: written from $PUSH_SECRET at start by the entrypoint
Include "/etc/prosody/conf.d/*.cfg.lua"
