//! The MCP server of the MCP example: a notes store with three tools
//! (`notes.search`, `notes.read`, `notes.publish`), served with the official
//! Rust MCP SDK (rmcp) over streamable HTTP.
//!
//! Every HTTP request must carry a tether task token addressed to this
//! server's own SPIFFE ID; a `tools/call` must also name a tool the token
//! carries. The local tether decides, on every request (`link::check`):
//! 401 with a `WWW-Authenticate: Bearer error="invalid_token"` challenge for
//! a token that is not valid here (expired, revoked, its task ended or its
//! owner dead, for another audience), 403 `insufficient_scope` for a tool
//! the task does not carry or a policy refuses.
//!
//! `notes.publish` calls the downstream publishing API. It never forwards
//! the token it received: it exchanges it through tether for a token
//! addressed to that API, with only `notes.publish`, which names this
//! server in its actor chain.
//!
//! With `--tls` it serves HTTPS with its own X.509-SVID (spiffe-rustls,
//! fed by an X509Source over tether's Workload API) and requires a client
//! certificate from its trust domain; the client's certificate is then
//! handed to tether with every validation, so a token bound to another
//! process's certificate (`cnf`) is refused.
//!
//! ```text
//! mcp-notes-server [--listen 127.0.0.1:7701] [--socket PATH] [--tls]
//!                  [--publish-url http://127.0.0.1:7702/publish]
//!                  [--publish-audience spiffe://tether.local/api/publish]
//! mcp-notes-server exchange --token-file F --audience A   # what an exchange by this server gives
//! ```
//!
//! Prints one line on stdout once it listens:
//! `mcp-notes-server: <SPIFFE ID> on http://<addr>/mcp`.

mod link;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use clap::{Parser, Subcommand};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, JsonObject,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tether::client::task::TaskClient;
use tether::proto::task as pb;

use self::link::{Accepted, Refusal};

/// Largest MCP request body read to find the tools it calls.
const MAX_BODY: usize = 1024 * 1024;
/// Most JSON-RPC messages in one batch.
const MAX_BATCH: usize = 16;

#[derive(Debug, Parser)]
#[command(about = "The MCP example's server: notes tools under tether task tokens")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on: loopback, or a node's address (MCP requests
    /// must name loopback or this address in their `Host` header: rmcp's
    /// guard against DNS rebinding).
    #[arg(long, default_value = "127.0.0.1:7701")]
    listen: SocketAddr,
    /// The workload socket of the local tether.
    #[arg(long, global = true)]
    socket: Option<String>,
    /// Where `notes.publish` sends a note.
    #[arg(long, default_value = "http://127.0.0.1:7702/publish")]
    publish_url: String,
    /// The publishing API's identity: the audience tokens are exchanged for.
    #[arg(long, default_value = "spiffe://tether.local/api/publish")]
    publish_audience: String,
    /// Serve HTTPS with this process's X.509-SVID, clients authenticated
    /// by theirs (mTLS).
    #[arg(long)]
    tls: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exchange a token as this server would, and print the new token
    /// (exit 1, with tether's reason, when the exchange is refused).
    Exchange {
        /// A file holding the subject token.
        #[arg(long)]
        token_file: PathBuf,
        /// The audience to ask for.
        #[arg(long)]
        audience: String,
        /// Tools of the new token (default: all of the subject token's).
        #[arg(long = "tool")]
        tools: Vec<String>,
    },
}

/// What every request handler shares.
#[derive(Debug)]
struct Shared {
    tasks: TaskClient,
    /// This server's SPIFFE ID: the audience its tokens must name.
    audience: String,
    publish_url: String,
    publish_audience: String,
    http: reqwest::Client,
}

/// The notes store; one per MCP session, over the same shared state.
#[derive(Debug, Clone)]
struct Notes {
    shared: Arc<Shared>,
}

#[tokio::main]
async fn main() -> Result<()> {
    link::install_crypto_provider();
    let args = Args::parse();
    let socket = link::socket(args.socket.as_deref())?;
    if let Some(Command::Exchange {
        token_file,
        audience,
        tools,
    }) = args.command
    {
        return exchange_command(&socket, &token_file, audience, tools).await;
    }

    let shared = Arc::new(Shared {
        audience: link::own_spiffe_id(&socket).await?,
        tasks: link::tasks(&socket).await?,
        publish_url: args.publish_url,
        publish_audience: args.publish_audience,
        http: reqwest::Client::new(),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let notes = Notes {
        shared: Arc::clone(&shared),
    };
    let mcp = StreamableHttpService::new(
        move || Ok(notes.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default()
            .with_cancellation_token(stop.child_token())
            .with_allowed_hosts(allowed_hosts(args.listen)),
    );
    let router = Router::new()
        .nest_service("/mcp", mcp)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            authorize,
        ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let tls = if args.tls {
        Some(tls_config(&socket, &shared.audience).await?)
    } else {
        None
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let stop_requested = link::stop_signal();
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "mcp-notes-server: {} on {scheme}://{addr}/mcp",
        shared.audience
    )?;
    stdout.flush()?;
    drop(stdout);
    match tls {
        Some(tls) => {
            serve_tls(listener, router, tls, stop, stop_requested).await;
            Ok(())
        }
        None => axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                stop_requested.await;
                stop.cancel();
            })
            .await
            .context("serving"),
    }
}

/// The `Host` names MCP requests may carry: loopback's (rmcp's default),
/// and the address listened on, unless it is every address (`0.0.0.0`:
/// then only loopback).
fn allowed_hosts(listen: SocketAddr) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        hosts.push(ip.to_string());
    }
    hosts
}

/// The mTLS server configuration: this process's SVID, and clients from
/// its own trust domain only.
async fn tls_config(
    socket: &std::path::Path,
    own_id: &str,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    let trust_domain = spiffe::SpiffeId::new(own_id)
        .context("this process's SPIFFE ID")?
        .trust_domain()
        .to_string();
    let source = link::x509_source(socket).await?;
    let config = spiffe_rustls::mtls_server(source)
        .authorize(spiffe_rustls::authorizer::trust_domains([
            trust_domain.as_str()
        ])?)
        .with_alpn_protocols([b"http/1.1".as_slice()])
        .build()?;
    Ok(Arc::new(config))
}

/// Accepts TLS connections until a stop signal; each connection's requests
/// carry the client's certificate ([`link::PeerCertificate`]).
async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
    stop: tokio_util::sync::CancellationToken,
    signal: impl Future<Output = ()>,
) {
    // Bounds a client cannot stretch: connections at once, the handshake,
    // the request headers, the drain at shutdown.
    const MAX_CONNECTIONS: usize = 256;
    const HANDSHAKE: Duration = Duration::from_secs(5);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(signal);
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let (tcp, peer) = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("mcp-notes-server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    eprintln!("mcp-notes-server: TLS handshake with {peer} failed: {e}");
                    return;
                }
                Err(_) => {
                    eprintln!("mcp-notes-server: TLS handshake with {peer} timed out");
                    return;
                }
            };
            let certificate = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| leaf.to_vec())
                .unwrap_or_default();
            let service = hyper_util::service::TowerToHyperService::new(
                router.layer(axum::Extension(link::PeerCertificate(certificate))),
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE);
            let connection = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HANDSHAKE, connection).await;
                }
            }
        });
    }
    stop.cancel();
}

/// Every request: a token tether accepts for this audience and for each
/// tool the body calls. The accepted token rides along in the request's
/// extensions, for `notes.publish` to exchange.
async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let Some(token) = link::bearer(request.headers()).map(str::to_owned) else {
        return refuse(&Refusal::Missing);
    };
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request too large").into_response();
    };
    let tools = match called_tools(&bytes) {
        Ok(tools) => tools,
        Err(problem) => return (StatusCode::BAD_REQUEST, problem).into_response(),
    };
    // Over mTLS, the client's certificate: a bound token must be presented
    // by the process it is bound to.
    let presenter = parts
        .extensions
        .get::<link::PeerCertificate>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    match link::check(&shared.tasks, &token, &shared.audience, &tools, &presenter).await {
        Ok(accepted) => {
            if !tools.is_empty() {
                eprintln!(
                    "mcp-notes-server: {} for {} (task {})",
                    tools.join(", "),
                    accepted.spiffe_id,
                    accepted.task_id
                );
            }
            parts.extensions.insert(accepted);
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(refusal) => refuse(&refusal),
    }
}

/// The tools a JSON-RPC body calls (`tools/call`, alone or in a batch).
/// A body that is not JSON calls nothing here; rmcp answers it.
fn called_tools(body: &[u8]) -> Result<Vec<String>, &'static str> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Ok(Vec::new());
    };
    let messages = match &value {
        Value::Array(batch) if batch.len() > MAX_BATCH => return Err("batch too large"),
        Value::Array(batch) => batch.iter().collect(),
        message => vec![message],
    };
    let mut tools = Vec::new();
    for message in messages {
        if message.get("method").and_then(Value::as_str) == Some("tools/call") {
            let name = message
                .pointer("/params/name")
                .and_then(Value::as_str)
                .ok_or("tools/call without a tool name")?;
            tools.push(name.to_owned());
        }
    }
    Ok(tools)
}

fn refuse(refusal: &Refusal) -> Response {
    refusal.response("mcp-notes-server")
}

/// `exchange`: one ExchangeToken as this process, printed.
async fn exchange_command(
    socket: &std::path::Path,
    token_file: &std::path::Path,
    audience: String,
    tools: Vec<String>,
) -> Result<()> {
    let subject = std::fs::read_to_string(token_file)
        .with_context(|| format!("reading {}", token_file.display()))?;
    let mut tasks = link::tasks(socket).await?;
    match tasks
        .exchange(pb::ExchangeTokenRequest {
            subject_token: subject.trim().to_owned(),
            audience,
            tools,
            bind_certificate: Vec::new(),
            subject_presenter_certificate: Vec::new(),
        })
        .await
    {
        Ok(token) => {
            println!("{}", token.token);
            Ok(())
        }
        Err(e) => {
            eprintln!("mcp-notes-server: exchange refused: {e}");
            std::process::exit(1);
        }
    }
}

// === the notes ===

/// The store's contents: fixed, so the example needs no database.
const NOTES: &[(&str, &str, &str)] = &[
    (
        "q3-summary",
        "Q3 ticket summary",
        "Q3: 412 tickets, median time to close 2.1 days, 3 incidents (all resolved).",
    ),
    (
        "q3-incidents",
        "Q3 incidents",
        "INC-77 login outage (40 min); INC-81 search latency; INC-90 stale cache.",
    ),
    (
        "q4-plan",
        "Q4 plan",
        "Q4: cut median time to close below 2 days; retire the legacy search cluster.",
    ),
];

fn schema(properties: Value, required: &[&str]) -> Arc<JsonObject> {
    let schema = json!({ "type": "object", "properties": properties, "required": required });
    Arc::new(match schema {
        Value::Object(object) => object,
        _ => JsonObject::new(),
    })
}

fn text(s: impl Into<String>) -> Vec<ContentBlock> {
    vec![ContentBlock::text(s)]
}

fn string_arg<'a>(request: &'a CallToolRequestParams, name: &str) -> Result<&'a str, ErrorData> {
    request
        .arguments
        .as_ref()
        .and_then(|arguments| arguments.get(name))
        .and_then(Value::as_str)
        .ok_or_else(|| ErrorData::invalid_params(format!("missing string argument {name:?}"), None))
}

impl ServerHandler for Notes {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "A notes store. Every call needs a tether task token addressed to this server that carries the tool.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let query = json!({ "query": { "type": "string", "description": "words to look for" } });
        let id =
            json!({ "id": { "type": "string", "description": "a note id from notes.search" } });
        Ok(ListToolsResult::with_all_items(vec![
            Tool::new(
                "notes.search",
                "Find notes whose title or text contains the words",
                schema(query, &["query"]),
            ),
            Tool::new("notes.read", "Read one note", schema(id.clone(), &["id"])),
            Tool::new(
                "notes.publish",
                "Publish a note through the publishing API (the token is exchanged, never forwarded)",
                schema(id, &["id"]),
            ),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let result = match request.name.as_ref() {
            "notes.search" => {
                let query = string_arg(&request, "query")?.to_lowercase();
                let words: Vec<&str> = query.split_whitespace().collect();
                let found: Vec<String> = NOTES
                    .iter()
                    .filter(|(_, title, body)| {
                        let haystack = format!("{title} {body}").to_lowercase();
                        words.iter().all(|word| haystack.contains(word))
                    })
                    .map(|(id, title, _)| format!("{id}: {title}"))
                    .collect();
                CallToolResult::success(text(found.join("\n")))
            }
            "notes.read" => match find(string_arg(&request, "id")?) {
                Some((_, title, body)) => CallToolResult::success(text(format!("{title}\n{body}"))),
                None => CallToolResult::error(text("no such note")),
            },
            "notes.publish" => {
                let Some(accepted) = context
                    .extensions
                    .get::<http::request::Parts>()
                    .and_then(|parts| parts.extensions.get::<Accepted>())
                else {
                    return Err(ErrorData::internal_error(
                        "no accepted token on this request",
                        None,
                    ));
                };
                match find(string_arg(&request, "id")?) {
                    Some(note) => self.publish(accepted, note).await,
                    None => CallToolResult::error(text("no such note")),
                }
            }
            other => {
                return Err(ErrorData::invalid_params(
                    format!("no tool {other:?}"),
                    None,
                ));
            }
        };
        Ok(result.into())
    }
}

fn find(id: &str) -> Option<(&'static str, &'static str, &'static str)> {
    NOTES.iter().copied().find(|(note, _, _)| *note == id)
}

impl Notes {
    /// Exchanges the caller's token for one addressed to the publishing
    /// API, and publishes with that. A refusal on either side is a tool
    /// error that says why.
    async fn publish(
        &self,
        accepted: &Accepted,
        (id, title, body): (&str, &str, &str),
    ) -> CallToolResult {
        let shared = &self.shared;
        let mut tasks = shared.tasks.clone();
        let exchanged = match tasks
            .exchange(pb::ExchangeTokenRequest {
                subject_token: accepted.token.clone(),
                audience: shared.publish_audience.clone(),
                tools: vec!["notes.publish".into()],
                bind_certificate: Vec::new(),
                // What our TLS session saw: a copied bound token is refused.
                subject_presenter_certificate: accepted.presenter.clone(),
            })
            .await
        {
            Ok(token) => token.token,
            Err(e) => {
                return CallToolResult::error(text(format!("tether refused the exchange: {e}")));
            }
        };
        let response = shared
            .http
            .post(&shared.publish_url)
            .bearer_auth(exchanged)
            .json(&json!({ "id": id, "title": title, "text": body }))
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => {
                let answer = response.text().await.unwrap_or_default();
                CallToolResult::success(text(format!("published {id}: {answer}")))
            }
            Ok(response) => {
                let status = response.status();
                let challenge = response
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                CallToolResult::error(text(format!(
                    "the publishing API refused ({status}): {challenge}"
                )))
            }
            Err(e) => {
                CallToolResult::error(text(format!("the publishing API is unreachable: {e}")))
            }
        }
    }
}
