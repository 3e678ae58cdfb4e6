//! The database schema, created and migrated by knock: an ordered list of migrations, each applied once, in
//! its own transaction, under an advisory lock so that instances starting together do not race.
//!
//! The tables hold what sled holds, in the same record format ([`crate::store::record`]): the node, the
//! keyed hashes of device and owner, the user's domain and the app in columns (for the lookups and for
//! people), the record (provider, hashes, secret hash, sealed tokens and account) as the authority. There
//! is no JID, no secret and no timestamp. A trigger tells every instance which node changed, so each keeps
//! its in-memory copy coherent ([`super::engine`]).

use tokio_postgres::Client;

use crate::store::StoreError;

/// The advisory lock held while migrating (any number; this one spells "knock").
const MIGRATION_LOCK: i64 = 0x006b_6e6f_636b;

/// The channel the trigger notifies: `<application_name> <node>` for every row written or deleted.
pub(super) const CHANNEL: &str = "knock_registrations";

/// The channel knock-token changes are notified on: `<application_name> <hash in hex>`.
pub(super) const KNOCK_CHANNEL: &str = "knock_tokens";

/// Every migration, in order; the schema's version is how many have been applied. Never edit or reorder
/// one that has shipped: add another.
const MIGRATIONS: &[&str] = &[
    // 1: registrations, the store's named values, dead tokens, and the change notification.
    r#"
    CREATE TABLE knock_meta (
        name text PRIMARY KEY,
        value bytea NOT NULL
    );
    CREATE TABLE knock_registrations (
        node text PRIMARY KEY,
        device bytea NOT NULL,
        owner bytea NOT NULL,
        domain text NOT NULL,
        app text NOT NULL,
        record bytea NOT NULL
    );
    CREATE INDEX knock_registrations_device ON knock_registrations (device);
    CREATE INDEX knock_registrations_owner ON knock_registrations (owner);
    CREATE TABLE knock_dead_tokens (
        token bytea PRIMARY KEY,
        until bigint NOT NULL
    );
    CREATE FUNCTION knock_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('knock_registrations',
            current_setting('application_name') || ' ' || COALESCE(NEW.node, OLD.node));
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER knock_notify AFTER INSERT OR UPDATE OR DELETE ON knock_registrations
        FOR EACH ROW EXECUTE FUNCTION knock_notify();
    "#,
    // 2: knock tokens (issue 21) by keyed hash, their owner's hash for listing, the record (node sealed);
    // changes notified on a channel of their own, as `<application_name> <hash in hex>`. The node is a
    // foreign key too, so a registration removed through any instance takes its tokens along, whatever
    // that instance knew of them (the node is in the clear in knock_registrations anyway).
    r#"
    CREATE TABLE knock_tokens (
        hash bytea PRIMARY KEY,
        owner bytea NOT NULL,
        node text NOT NULL REFERENCES knock_registrations (node) ON DELETE CASCADE,
        record bytea NOT NULL
    );
    CREATE INDEX knock_tokens_owner ON knock_tokens (owner);
    CREATE INDEX knock_tokens_node ON knock_tokens (node);
    CREATE FUNCTION knock_notify_token() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('knock_tokens',
            current_setting('application_name') || ' ' || encode(COALESCE(NEW.hash, OLD.hash), 'hex'));
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER knock_notify_token AFTER INSERT OR UPDATE OR DELETE ON knock_tokens
        FOR EACH ROW EXECUTE FUNCTION knock_notify_token();
    "#,
];

/// Bring the schema to the current version; returns the version it was at.
pub(super) async fn migrate(client: &mut Client) -> Result<usize, StoreError> {
    let tx = client.transaction().await.map_err(io)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(io)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS knock_schema (version integer NOT NULL)")
        .await
        .map_err(io)?;
    let row = tx
        .query_opt("SELECT version FROM knock_schema", &[])
        .await
        .map_err(io)?;
    let was = match row {
        Some(row) => usize::try_from(row.get::<_, i32>(0)).unwrap_or(usize::MAX),
        None => {
            tx.execute("INSERT INTO knock_schema (version) VALUES (0)", &[])
                .await
                .map_err(io)?;
            0
        }
    };
    if was > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "the database's schema is version {was}, newer than this knock knows ({}): run a newer knock",
            MIGRATIONS.len()
        )));
    }
    for migration in &MIGRATIONS[was..] {
        tx.batch_execute(migration).await.map_err(io)?;
    }
    let now = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    tx.execute("UPDATE knock_schema SET version = $1", &[&now])
        .await
        .map_err(io)?;
    tx.commit().await.map_err(io)?;
    Ok(was)
}

/// A database error as a store error, with PostgreSQL's own message (never a value: knock's queries
/// carry tokens and hashes only as parameters, which errors do not repeat).
pub(super) fn io(e: tokio_postgres::Error) -> StoreError {
    StoreError::Io(match e.as_db_error() {
        Some(db) => format!("PostgreSQL: {}", db.message()),
        None => format!("PostgreSQL: {}", crate::push::http::error_chain(&e)),
    })
}
