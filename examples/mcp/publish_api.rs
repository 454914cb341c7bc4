//! The downstream API of the MCP example: a plain HTTP service that
//! publishes notes. It is not an MCP server and never sees the agent's
//! token: it accepts only a token addressed to itself (its own SPIFFE ID),
//! for the tool `notes.publish`, that the MCP server obtained by exchange
//! (the MCP server is the newest actor in the token's chain).
//!
//! ```text
//! notes-publish-api [--listen 127.0.0.1:7702] [--socket PATH] [--actor SPIFFE_ID]
//! POST /publish  {"id", "title", "text"}  Authorization: Bearer <task token>
//! GET  /published                          what was published, by whom, through whom
//! ```
//!
//! Prints one line on stdout once it listens:
//! `notes-publish-api: <SPIFFE ID> on http://<addr>`.

mod link;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context as _, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tether::client::task::TaskClient;

use self::link::Refusal;

/// Largest request body: a note.
const MAX_BODY: usize = 64 * 1024;
/// Notes kept in memory; the oldest goes first.
const MAX_PUBLISHED: usize = 1024;
/// The tool a publishing token must carry.
const TOOL: &str = "notes.publish";

#[derive(Debug, Parser)]
#[command(about = "The MCP example's downstream API: publishes notes for tokens exchanged to it")]
struct Args {
    /// Address to listen on: loopback, or a node's address.
    #[arg(long, default_value = "127.0.0.1:7702")]
    listen: SocketAddr,
    /// The workload socket of the local tether.
    #[arg(long)]
    socket: Option<String>,
    /// The SPIFFE ID that must be the newest actor of a token: the MCP
    /// server, which exchanged the agent's token for one addressed here.
    #[arg(long, default_value = "spiffe://tether.local/mcp/notes")]
    actor: String,
}

/// A note to publish.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct Note {
    id: String,
    title: String,
    text: String,
}

/// A published note and who was behind it.
#[derive(Debug, Clone, Serialize)]
struct Published {
    note: Note,
    /// The workload the task belongs to (`sub`).
    subject: String,
    /// The task.
    task_id: String,
    /// The actor chain, newest first.
    actors: Vec<String>,
}

#[derive(Debug)]
struct Api {
    tasks: TaskClient,
    audience: String,
    actor: String,
    published: Mutex<Vec<Published>>,
}

#[tokio::main]
async fn main() -> Result<()> {
    link::install_crypto_provider();
    let args = Args::parse();
    let socket = link::socket(args.socket.as_deref())?;
    let audience = link::own_spiffe_id(&socket).await?;
    let api = Arc::new(Api {
        tasks: link::tasks(&socket).await?,
        audience,
        actor: args.actor,
        published: Mutex::new(Vec::new()),
    });
    let router = Router::new()
        .route("/publish", post(publish))
        .route("/published", get(published))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::clone(&api));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let stop_requested = link::stop_signal();
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "notes-publish-api: {} on http://{addr}",
        api.audience
    )?;
    stdout.flush()?;
    drop(stdout);
    axum::serve(listener, router)
        .with_graceful_shutdown(stop_requested)
        .await
        .context("serving")
}

/// `POST /publish`: the token must be addressed here, carry `notes.publish`,
/// and come through the configured actor.
async fn publish(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(note): Json<Note>,
) -> Response {
    let Some(token) = link::bearer(&headers) else {
        return refuse(&Refusal::Missing);
    };
    let accepted = match link::check(&api.tasks, token, &api.audience, &[TOOL.into()], &[]).await {
        Ok(accepted) => accepted,
        Err(refusal) => return refuse(&refusal),
    };
    if accepted.actors.first() != Some(&api.actor) {
        return refuse(&Refusal::InsufficientScope(format!(
            "the token must come through {} (actor chain: [{}])",
            api.actor,
            accepted.actors.join(", ")
        )));
    }
    eprintln!(
        "notes-publish-api: publishing {:?} for {} (task {}) via [{}]",
        note.id,
        accepted.spiffe_id,
        accepted.task_id,
        accepted.actors.join(", ")
    );
    let entry = Published {
        note,
        subject: accepted.spiffe_id,
        task_id: accepted.task_id,
        actors: accepted.actors,
    };
    let mut published = api.published.lock().unwrap_or_else(PoisonError::into_inner);
    if published.len() == MAX_PUBLISHED {
        published.remove(0);
    }
    published.push(entry.clone());
    (StatusCode::CREATED, Json(entry)).into_response()
}

/// `GET /published`: everything published so far (a demo has no secrets
/// here: notes and identities, never tokens).
async fn published(State(api): State<Arc<Api>>) -> Json<Vec<Published>> {
    Json(
        api.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
    )
}

fn refuse(refusal: &Refusal) -> Response {
    refusal.response("notes-publish-api")
}
