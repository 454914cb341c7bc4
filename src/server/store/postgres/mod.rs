//! The server's store in PostgreSQL, for several replicas
//! (`store = "postgres://…"`), through `tokio-postgres`.
//!
//! The schema is the SQLite backend's (times as BIGINT unix milliseconds,
//! the token hash as BYTEA, specs as TEXT JSON), created by append-only
//! steps under an advisory lock (`schema`), and every method runs the
//! statements the SQLite backend runs (`store::sql`) through the same row
//! codec (`store::rows`); `ops` holds the transactions, `tasks` those of
//! the fleet's task index.
//!
//! [`PostgresStore`] is a cheap handle to one connection per replica,
//! behind an async mutex: a call waits its turn, runs, and its writes are
//! committed before its future resolves.
//!
//! Never hanging, never spinning:
//! - every session sets `statement_timeout` and `lock_timeout`
//!   ([`STATEMENT_TIMEOUT`]), a connection attempt is bounded
//!   (`connect_timeout`, 5 s unless the URL says), and each call as a whole
//!   is bounded by [`CALL_TIMEOUT`] on the client side (a peer gone
//!   silent), after which the connection is dropped;
//! - a dropped connection is reopened by the next call; while PostgreSQL
//!   cannot be reached, attempts are spaced by a backoff doubling from
//!   250 ms to 5 s, and calls in between fail at once with
//!   [`ServerStoreError::Unavailable`]. The server keeps serving the last
//!   entries it read (its registry's snapshot) meanwhile.
//!
//! Not in this slice:
//! - TLS to PostgreSQL. A URL asking for it (`sslmode=require`,
//!   `verify-ca`, `verify-full`) is refused (`PostgresError::TlsUnsupported`):
//!   reach PostgreSQL over a Unix socket (`?host=/run/postgresql`) or a
//!   loopback or private link.
//! - `LISTEN/NOTIFY`: other replicas' entry changes are seen by polling the
//!   revision (the registry's refresh loop).
//!
//! Give the server a database of its own: its tables have plain names
//! (`entries`, `nodes`, …) and `tether_schema` records their version.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use super::{
    EntriesSnapshot, EntryRecord, FleetTaskEndRequest, FleetTaskRow, NewFleetTask, NodeRow,
    ServerStore, ServerStoreError,
};
use crate::error::Chain;
use crate::server::join_token::{Admission, TokenHash};
use crate::server::scope::NodeName;

mod ops;
mod schema;
mod tasks;
mod url;

pub use url::check_url;

/// How long one statement may run on PostgreSQL, and how long it may wait
/// for a lock (another replica's transaction, the migration lock).
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take as a whole, connecting included, before it
/// fails [`ServerStoreError::Unavailable`] and its connection is dropped.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The first wait between two failed connection attempts.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The server's store in one PostgreSQL database. Cheap to clone: clones
/// share one connection.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

struct Shared {
    config: tokio_postgres::Config,
    slot: Mutex<Slot>,
}

/// The connection, or when the next attempt to open one may be made.
#[derive(Default)]
struct Slot {
    client: Option<Client>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// Why PostgreSQL could not be used: the cause inside a
/// [`ServerStoreError::Open`] or [`ServerStoreError::Unavailable`].
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The URL asks for TLS, which this version does not speak to
    /// PostgreSQL.
    #[error(
        "sslmode={sslmode}: TLS to PostgreSQL is not supported yet; reach it over a Unix socket (?host=/run/postgresql) or a loopback or private link, with sslmode=disable or prefer"
    )]
    TlsUnsupported {
        /// The mode asked for.
        sslmode: String,
    },
    /// Not a `postgres://` or `postgresql://` URL.
    #[error("expected a postgres:// or postgresql:// URL")]
    NotAUrl,
    /// The URL is longer than any the server accepts.
    #[error("the PostgreSQL URL is longer than {max} bytes")]
    UrlTooLong {
        /// The bound.
        max: usize,
    },
    /// `tokio-postgres` refused the URL.
    #[error("the PostgreSQL URL is not valid")]
    Url(#[source] tokio_postgres::Error),
    /// Connecting (or setting the session's timeouts) failed.
    #[error("could not connect to PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
    /// Connecting took longer than its bound.
    #[error("connecting to PostgreSQL took longer than {0:?}")]
    ConnectTimedOut(Duration),
    /// The connection was lost, and the next attempt to reopen it is not
    /// due yet (backoff).
    #[error("the connection to PostgreSQL is down; the next attempt is in {0:?}")]
    Reconnecting(Duration),
    /// A call took longer than its bound; its connection was dropped.
    #[error("the call took longer than {0:?}; its connection was dropped")]
    TimedOut(Duration),
    /// A statement failed (refused by PostgreSQL, or the connection broke).
    #[error("a statement failed")]
    Statement(#[source] tokio_postgres::Error),
    /// Reading or recording the schema version failed.
    #[error("could not migrate the server store's schema")]
    Migrate(#[source] tokio_postgres::Error),
    /// A schema step failed.
    #[error("could not apply schema step v{version}")]
    Step {
        /// The step's version.
        version: i32,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The database's schema is newer than this build's.
    #[error(
        "the database's schema is at version {found}, newer than this build's {known}: run a newer tether"
    )]
    NewerSchema {
        /// The version recorded in `tether_schema`.
        found: i32,
        /// The newest version this build knows.
        known: i32,
    },
}

/// A call's failure: PostgreSQL's (mapped by [`Session::settle`]) or the
/// store's own (a refused row, a duplicate, damage).
#[derive(Debug)]
enum Fail {
    Pg(tokio_postgres::Error),
    Store(ServerStoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<ServerStoreError> for Fail {
    fn from(e: ServerStoreError) -> Self {
        Fail::Store(e)
    }
}

// === impl PostgresStore ===

impl PostgresStore {
    /// Connects to the database at `url` and brings its schema up to date
    /// (under the migration lock, so replicas may start at once). Refused
    /// with [`ServerStoreError::Open`]: a URL asking for TLS or otherwise
    /// invalid ([`check_url`]), a database that cannot be reached within
    /// [`CALL_TIMEOUT`], or one whose schema is newer than this build's.
    pub async fn connect(url: &str) -> Result<PostgresStore, ServerStoreError> {
        PostgresStore::connect_with(url, schema::STEPS).await
    }

    /// [`PostgresStore::connect`] as a build that knows only `steps` would.
    async fn connect_with(url: &str, steps: &[&str]) -> Result<PostgresStore, ServerStoreError> {
        let open = |e: PostgresError| ServerStoreError::Open(Box::new(e));
        let config = url::parse(url).map_err(open)?;
        let mut client = open_session(&config).await.map_err(open)?;
        match tokio::time::timeout(CALL_TIMEOUT, schema::migrate(&mut client, steps)).await {
            Ok(migrated) => migrated.map_err(open)?,
            Err(_) => return Err(open(PostgresError::TimedOut(CALL_TIMEOUT))),
        }
        Ok(PostgresStore {
            shared: Arc::new(Shared {
                config,
                slot: Mutex::new(Slot {
                    client: Some(client),
                    ..Slot::default()
                }),
            }),
        })
    }

    /// This replica's connection, opened again if it was lost and an
    /// attempt is due; [`ServerStoreError::Unavailable`] otherwise.
    async fn session(&self, what: &'static str) -> Result<Session<'_>, ServerStoreError> {
        let unavailable = |e: PostgresError| ServerStoreError::Unavailable {
            what,
            source: Box::new(e),
        };
        let mut slot = tokio::time::timeout(CALL_TIMEOUT, self.shared.slot.lock())
            .await
            .map_err(|_| unavailable(PostgresError::TimedOut(CALL_TIMEOUT)))?;
        if slot.client.as_ref().is_some_and(Client::is_closed) {
            tracing::warn!("the connection to PostgreSQL was lost; reconnecting");
            slot.client = None;
        }
        if slot.client.is_none() {
            let now = Instant::now();
            if let Some(at) = slot.retry_at.filter(|at| *at > now) {
                return Err(unavailable(PostgresError::Reconnecting(at - now)));
            }
            match open_session(&self.shared.config).await {
                Ok(client) => {
                    tracing::info!("reconnected to PostgreSQL");
                    *slot = Slot {
                        client: Some(client),
                        ..Slot::default()
                    };
                }
                Err(error) => {
                    slot.backoff = (slot.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                    slot.retry_at = Some(Instant::now() + slot.backoff);
                    return Err(unavailable(error));
                }
            }
        }
        Ok(Session { slot })
    }

    /// Runs one call: takes the session, runs `op` on its client within
    /// [`CALL_TIMEOUT`], maps the outcome.
    async fn call<T>(
        &self,
        what: &'static str,
        op: impl AsyncFnOnce(&mut Client) -> Result<T, Fail>,
    ) -> Result<T, ServerStoreError> {
        let mut session = self.session(what).await?;
        let Some(client) = session.slot.client.as_mut() else {
            // `session` returns only with a client in the slot.
            return Err(ServerStoreError::Unavailable {
                what,
                source: Box::new(PostgresError::Reconnecting(Duration::ZERO)),
            });
        };
        let outcome = tokio::time::timeout(CALL_TIMEOUT, op(client)).await;
        session.settle(what, outcome)
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hosts and database only: never the password.
        f.debug_struct("PostgresStore")
            .field("hosts", &self.shared.config.get_hosts())
            .field("ports", &self.shared.config.get_ports())
            .field("dbname", &self.shared.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// The held connection of one call.
struct Session<'a> {
    slot: MutexGuard<'a, Slot>,
}

impl Session<'_> {
    /// Maps a call's outcome; drops the connection when it timed out or
    /// broke, so the next call opens a new one.
    fn settle<T>(
        &mut self,
        what: &'static str,
        outcome: Result<Result<T, Fail>, tokio::time::error::Elapsed>,
    ) -> Result<T, ServerStoreError> {
        let error = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(Fail::Store(error))) => return Err(error),
            Ok(Err(Fail::Pg(error))) => {
                // No SQLSTATE: not PostgreSQL refusing a statement but the
                // link failing (I/O, protocol): start afresh.
                let broken = error.code().is_none()
                    || self.slot.client.as_ref().is_none_or(Client::is_closed);
                if broken {
                    self.drop_client();
                }
                PostgresError::Statement(error)
            }
            Err(_) => {
                self.drop_client();
                PostgresError::TimedOut(CALL_TIMEOUT)
            }
        };
        Err(ServerStoreError::Unavailable {
            what,
            source: Box::new(error),
        })
    }

    fn drop_client(&mut self) {
        self.slot.client = None;
        // The next call may try at once; backoff starts if that fails.
        self.slot.retry_at = None;
    }
}

/// Opens a connection, spawns the job that drives it (it ends when the
/// client is dropped or the link breaks), and sets the session's timeouts.
async fn open_session(config: &tokio_postgres::Config) -> Result<Client, PostgresError> {
    let bound = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(url::CONNECT_TIMEOUT)
        .min(CALL_TIMEOUT);
    let connected = tokio::time::timeout(bound, config.connect(NoTls))
        .await
        .map_err(|_| PostgresError::ConnectTimedOut(bound))?;
    let (client, connection) = connected.map_err(PostgresError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %Chain(&error), "the connection to PostgreSQL ended");
        }
    });
    let ms = STATEMENT_TIMEOUT.as_millis();
    let settings = format!(
        "SET statement_timeout = {ms}; SET lock_timeout = {ms}; \
         SET idle_in_transaction_session_timeout = {}",
        CALL_TIMEOUT.as_millis() * 2
    );
    tokio::time::timeout(bound, client.batch_execute(&settings))
        .await
        .map_err(|_| PostgresError::ConnectTimedOut(bound))?
        .map_err(PostgresError::Connect)?;
    Ok(client)
}

impl ServerStore for PostgresStore {
    fn add_join_token(
        &self,
        hash: TokenHash,
        admission: Admission,
    ) -> BoxFuture<'_, Result<(), ServerStoreError>> {
        Box::pin(self.call("adding a join token", async move |c| {
            ops::add_join_token(c, hash, admission).await
        }))
    }

    fn consume_join_token(
        &self,
        hash: TokenHash,
        now: std::time::SystemTime,
    ) -> BoxFuture<'_, Result<Option<Admission>, ServerStoreError>> {
        Box::pin(self.call("consuming a join token", async move |c| {
            ops::consume_join_token(c, hash, now).await
        }))
    }

    fn prune_join_tokens(
        &self,
        before: std::time::SystemTime,
    ) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        Box::pin(self.call("pruning join tokens", async move |c| {
            ops::prune_join_tokens(c, before).await
        }))
    }

    fn put_node(&self, node: NodeRow) -> BoxFuture<'_, Result<(), ServerStoreError>> {
        Box::pin(self.call("recording a node", async move |c| {
            ops::put_node(c, node).await
        }))
    }

    fn renew_node(&self, node: NodeRow) -> BoxFuture<'_, Result<bool, ServerStoreError>> {
        Box::pin(self.call("renewing a node", async move |c| {
            ops::renew_node(c, node).await
        }))
    }

    fn node(&self, name: NodeName) -> BoxFuture<'_, Result<Option<NodeRow>, ServerStoreError>> {
        Box::pin(self.call("reading a node", async move |c| ops::node(c, name).await))
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeRow>, ServerStoreError>> {
        Box::pin(self.call("listing nodes", async move |c| ops::nodes(c).await))
    }

    fn evict_node(
        &self,
        name: NodeName,
    ) -> BoxFuture<'_, Result<Option<NodeRow>, ServerStoreError>> {
        Box::pin(self.call("evicting a node", async move |c| {
            ops::evict_node(c, name).await
        }))
    }

    fn create_entry(&self, entry: EntryRecord) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        Box::pin(self.call("creating an entry", async move |c| {
            ops::create_entry(c, entry).await
        }))
    }

    fn delete_entry(&self, id: String) -> BoxFuture<'_, Result<bool, ServerStoreError>> {
        Box::pin(self.call("deleting an entry", async move |c| {
            ops::delete_entry(c, id).await
        }))
    }

    fn entries(&self) -> BoxFuture<'_, Result<EntriesSnapshot, ServerStoreError>> {
        Box::pin(self.call("reading the entries", async move |c| ops::entries(c).await))
    }

    fn revision(&self) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        Box::pin(self.call("reading the entries' revision", async move |c| {
            ops::revision(c).await
        }))
    }

    fn publish_bundle(
        &self,
        replica_id: String,
        spiffe_json: String,
        now: std::time::SystemTime,
    ) -> BoxFuture<'_, Result<(), ServerStoreError>> {
        Box::pin(self.call("publishing a bundle", async move |c| {
            ops::publish_bundle(c, replica_id, spiffe_json, now).await
        }))
    }

    fn bundles(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, ServerStoreError>> {
        Box::pin(self.call("reading the published bundles", async move |c| {
            ops::bundles(c).await
        }))
    }

    fn forget_bundle(&self, replica_id: String) -> BoxFuture<'_, Result<bool, ServerStoreError>> {
        Box::pin(self.call("forgetting a bundle", async move |c| {
            ops::forget_bundle(c, replica_id).await
        }))
    }

    fn begin_fleet_task(
        &self,
        task: NewFleetTask,
    ) -> BoxFuture<'_, Result<FleetTaskRow, ServerStoreError>> {
        Box::pin(self.call("recording a fleet task", async move |c| {
            tasks::begin(c, task).await
        }))
    }

    fn fleet_task(
        &self,
        txn: String,
    ) -> BoxFuture<'_, Result<Option<FleetTaskRow>, ServerStoreError>> {
        Box::pin(self.call("reading a fleet task", async move |c| {
            tasks::task(c, txn).await
        }))
    }

    fn fleet_tasks(
        &self,
        include_ended: bool,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<FleetTaskRow>, ServerStoreError>> {
        Box::pin(self.call("listing fleet tasks", async move |c| {
            tasks::tasks(c, include_ended, limit).await
        }))
    }

    fn end_fleet_tasks(
        &self,
        ends: Vec<FleetTaskEndRequest>,
        owner: Option<NodeName>,
    ) -> BoxFuture<'_, Result<Vec<Option<FleetTaskRow>>, ServerStoreError>> {
        Box::pin(self.call("ending fleet tasks", async move |c| {
            tasks::end(c, ends, owner).await
        }))
    }

    fn fleet_task_ends(
        &self,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<FleetTaskRow>, ServerStoreError>> {
        Box::pin(self.call("reading fleet task ends", async move |c| {
            tasks::ends(c, after, limit).await
        }))
    }

    fn fleet_task_ends_revision(&self) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        Box::pin(
            self.call("reading the task ends' revision", async move |c| {
                tasks::ends_revision(c).await
            }),
        )
    }

    fn live_fleet_tasks_of(
        &self,
        owner: NodeName,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<String>, ServerStoreError>> {
        Box::pin(
            self.call("listing a node's live fleet tasks", async move |c| {
                tasks::live_of(c, &owner, limit).await
            }),
        )
    }

    fn fleet_tasks_of(&self, owner: NodeName) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        Box::pin(self.call("counting a node's fleet tasks", async move |c| {
            tasks::count_of(c, &owner).await
        }))
    }

    fn prune_fleet_tasks(
        &self,
        before: std::time::SystemTime,
    ) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        Box::pin(self.call("pruning fleet tasks", async move |c| {
            tasks::prune(c, before).await
        }))
    }
}

#[cfg(test)]
mod tests;
