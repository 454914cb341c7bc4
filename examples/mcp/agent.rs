//! The MCP agent (client) of the MCP example. It holds no standing
//! credential: for one piece of work it asks its local tether for a task
//! (audience: the notes server, a stated intent, the tools it needs),
//! calls the tools with the task token over MCP (rmcp, streamable HTTP),
//! and ends the task when done. Its plan is fixed: search the notes, read
//! the first hit, publish it; a step whose tool the task lacks is refused
//! by the server, and the agent says so.
//!
//! ```text
//! mcp-agent run --intent TEXT --tool T [--tool T ...] [--query Q] [--ttl 5m]
//!               [--server URL] [--audience A] [--token-file F] [--hold] [--tls]
//! mcp-agent present --token-file F (--tool T [--arg K=V ...] | --publish-url URL) [--tls]
//! ```
//!
//! `run --hold` keeps the task open after the calls (its token in
//! `--token-file`, refreshed as tether renews it) until SIGINT or SIGTERM,
//! then ends it; killed instead, its task dies with it. `present` shows a
//! token in another process's hands: it calls one tool, or posts straight to
//! the publishing API, with a token it did not get from tether.
//!
//! With `--tls` the agent talks to the server over mTLS (spiffe-rustls fed
//! by an X509Source over tether's Workload API), accepts only the server's
//! SPIFFE ID (`--server-id`), and binds its task to its own X.509-SVID: the
//! token then carries `cnf`, and the server hands tether the certificate
//! each request came with, so a copied token is refused in other hands.
//!
//! Exit status: 0 when every call succeeded, 1 when one was refused or
//! failed, 2 for bad flags.

mod link;

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use rmcp::ServiceExt as _;
use rmcp::model::{CallToolRequestParams, JsonObject};
use rmcp::service::{ClientInitializeError, RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::{
    AuthRequiredError, InsufficientScopeError, StreamableHttpClientTransportConfig,
};
use serde_json::Value;
use tether::proto::task as pb;

#[derive(Debug, Parser)]
#[command(about = "The MCP example's agent: one task, one audience, a few tools")]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// The workload socket of the local tether.
    #[arg(long, global = true)]
    socket: Option<String>,
    /// The MCP server's endpoint.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7701/mcp")]
    server: String,
    /// Talk to the server over mTLS with this process's X.509-SVID (and
    /// bind the task to it); the server must be `--server-id`.
    #[arg(long, global = true)]
    tls: bool,
    /// The SPIFFE ID the server must prove over mTLS.
    #[arg(long, global = true, default_value = "spiffe://tether.local/mcp/notes")]
    server_id: String,
}

/// How this process reaches the MCP server.
struct Link {
    server: String,
    /// An mTLS client, and this process's certificate, with `--tls`.
    tls: Option<(reqwest::Client, Vec<u8>)>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Begin a task, run the plan with its token, end the task.
    Run(Plan),
    /// Present a token this process did not get from tether.
    Present {
        /// The file holding the token.
        #[arg(long)]
        token_file: PathBuf,
        /// Call this tool on the MCP server.
        #[arg(
            long,
            conflicts_with = "publish_url",
            required_unless_present = "publish_url"
        )]
        tool: Option<String>,
        /// An argument of the tool call, KEY=VALUE (repeat).
        #[arg(long = "arg", value_parser = key_value)]
        args: Vec<(String, String)>,
        /// Post the token straight to the publishing API instead (a forward).
        #[arg(long)]
        publish_url: Option<String>,
    },
}

/// The outcome of one call, as the agent reports it.
enum Outcome {
    Ok(String),
    /// The tool ran and reported an error.
    ToolError(String),
    /// The server refused the request: status and challenge.
    Refused(u16, String),
    Failed(String),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    link::install_crypto_provider();
    let args = Args::parse();
    let link = match connect_link(&args).await {
        Ok(link) => link,
        Err(e) => {
            eprintln!("mcp-agent: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Command::Run(plan) => run(args.socket.as_deref(), &link, plan).await,
        Command::Present {
            token_file,
            tool,
            args: tool_args,
            publish_url,
        } => present(&link, &token_file, tool, tool_args, publish_url).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mcp-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The server's address and, with `--tls`, the mTLS client.
async fn connect_link(args: &Args) -> Result<Link> {
    let tls = if args.tls {
        let socket = link::socket(args.socket.as_deref())?;
        let source = link::x509_source(&socket).await?;
        let certificate = link::leaf_certificate(&source)?;
        let config = spiffe_rustls::mtls_client(source)
            .authorize(spiffe_rustls::authorizer::exact([args.server_id.as_str()])?)
            .with_alpn_protocols([b"http/1.1".as_slice()])
            .build()?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .build()
            .context("building the mTLS client")?;
        Some((client, certificate))
    } else {
        None
    };
    Ok(Link {
        server: args.server.clone(),
        tls,
    })
}

/// `run`: what the task is for, and how to run it.
#[derive(Debug, clap::Args)]
struct Plan {
    /// What the work is for (recorded with the task and in the audit trail).
    #[arg(long)]
    intent: String,
    /// A tool the task may use (repeat).
    #[arg(long = "tool", required = true)]
    tools: Vec<String>,
    /// The audience: the MCP server's SPIFFE ID.
    #[arg(long, default_value = "spiffe://tether.local/mcp/notes")]
    audience: String,
    /// What to search the notes for.
    #[arg(long, default_value = "q3")]
    query: String,
    /// The task's lifetime.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Write the task token here (0600), and keep it fresh with --hold.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Keep the task after the calls until SIGINT or SIGTERM.
    #[arg(long)]
    hold: bool,
}

/// `run`: begin, call, (hold,) end. `Ok(true)` when every call succeeded.
async fn run(socket: Option<&str>, link: &Link, plan: Plan) -> Result<bool> {
    let socket = link::socket(socket)?;
    let mut tasks = link::tasks(&socket).await?;
    let begun = tasks
        .begin(pb::BeginTaskRequest {
            audience: plan.audience.clone(),
            intent: plan.intent.clone(),
            tools: plan.tools.clone(),
            ttl_ms: u64::try_from(plan.ttl.as_millis()).unwrap_or(u64::MAX),
            // Over mTLS the task is bound to this process's certificate.
            bind_certificate: link
                .tls
                .as_ref()
                .map(|(_, certificate)| certificate.clone())
                .unwrap_or_default(),
            ..pb::BeginTaskRequest::default()
        })
        .await
        .context("beginning the task")?;
    let token = begun.token.context("tether answered without a token")?;
    println!(
        "task {} began: {} for {:?}, tools {}, until {}",
        begun.task_id,
        plan.audience,
        plan.intent,
        plan.tools.join(" "),
        time_of(begun.deadline_ms)
    );
    if let Some(file) = &plan.token_file {
        write_token(file, &token.token)?;
    }

    let all_ok = match call_plan(link, &token.token, &plan.query).await {
        Ok(all_ok) => all_ok,
        Err(e) => {
            println!("mcp session failed: {e:#}");
            false
        }
    };

    if plan.hold {
        let stop = link::stop_signal();
        println!("holding task {}; stop with Ctrl-C", begun.task_id);
        std::io::stdout().flush()?;
        if !hold(&mut tasks, &begun.task_id, plan.token_file.as_deref(), stop).await? {
            return Ok(false);
        }
    }
    tasks
        .end(begun.task_id.clone())
        .await
        .context("ending the task")?;
    println!("task {} ended", begun.task_id);
    Ok(all_ok)
}

/// Connects with the task token and runs the plan: search, read the first
/// hit, publish it. Every step runs, whatever the one before it gave.
async fn call_plan(link: &Link, token: &str, query: &str) -> Result<bool> {
    let client = connect(link, token).await?;
    let offered = client.list_all_tools().await.context("listing tools")?;
    let mut names: Vec<_> = offered.iter().map(|tool| tool.name.to_string()).collect();
    names.sort();
    println!("tools offered: {}", names.join(", "));

    let mut all_ok = true;
    let found = call(&client, "notes.search", &[("query", query)]).await;
    let first = match &found {
        Outcome::Ok(text) => text
            .lines()
            .next()
            .and_then(|l| l.split(':').next())
            .map(str::to_owned),
        _ => None,
    };
    all_ok &= report("notes.search", &found);
    let id = first.unwrap_or_else(|| "q3-summary".into());
    for tool in ["notes.read", "notes.publish"] {
        let outcome = call(&client, tool, &[("id", &id)]).await;
        all_ok &= report(tool, &outcome);
    }
    client.cancel().await.ok();
    Ok(all_ok)
}

async fn connect(link: &Link, token: &str) -> Result<RunningService<RoleClient, ()>> {
    let server = link.server.as_str();
    let config = StreamableHttpClientTransportConfig::with_uri(server).auth_header(token);
    let transport = match &link.tls {
        Some((client, _)) => StreamableHttpClientTransport::with_client(client.clone(), config),
        None => StreamableHttpClientTransport::from_config(config),
    };
    match ().serve(transport).await {
        Ok(client) => Ok(client),
        // The transport error is a field, not the error's source.
        Err(ClientInitializeError::TransportError { error, .. }) => match challenge_of(&error) {
            Some((status, challenge)) => bail!("the server refused ({status}): {challenge}"),
            None => Err(error).with_context(|| format!("connecting to {server}")),
        },
        Err(e) => match challenge_of(&e) {
            Some((status, challenge)) => bail!("the server refused ({status}): {challenge}"),
            None => Err(e).with_context(|| format!("connecting to {server}")),
        },
    }
}

async fn call(
    client: &RunningService<RoleClient, ()>,
    tool: &str,
    args: &[(&str, &str)],
) -> Outcome {
    let arguments: JsonObject = args
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
        .collect();
    let request = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments);
    match client.call_tool(request).await {
        Ok(result) => {
            let text: Vec<String> = result
                .content
                .iter()
                .filter_map(|block| block.as_text().map(|t| t.text.clone()))
                .collect();
            if result.is_error == Some(true) {
                Outcome::ToolError(text.join(" "))
            } else {
                Outcome::Ok(text.join("\n"))
            }
        }
        Err(e) => match challenge_of(&e) {
            Some((status, challenge)) => Outcome::Refused(status, challenge),
            None => Outcome::Failed(e.to_string()),
        },
    }
}

/// Prints one call's outcome; true when it succeeded.
fn report(tool: &str, outcome: &Outcome) -> bool {
    let line = |s: &str| s.replace('\n', " | ");
    match outcome {
        Outcome::Ok(text) => println!("{tool} -> ok: {}", line(text)),
        Outcome::ToolError(text) => println!("{tool} -> tool error: {}", line(text)),
        Outcome::Refused(status, challenge) => {
            println!("{tool} -> refused ({status}): {challenge}")
        }
        Outcome::Failed(e) => println!("{tool} -> failed: {e}"),
    }
    matches!(outcome, Outcome::Ok(_))
}

/// The HTTP status and `WWW-Authenticate` challenge behind an rmcp error,
/// if the server refused the request.
fn challenge_of(error: &(dyn std::error::Error + 'static)) -> Option<(u16, String)> {
    let mut source = Some(error);
    while let Some(current) = source {
        if let Some(e) = current.downcast_ref::<AuthRequiredError>() {
            return Some((401, e.www_authenticate_header.clone()));
        }
        if let Some(e) = current.downcast_ref::<InsufficientScopeError>() {
            return Some((403, e.www_authenticate_header.clone()));
        }
        source = current.source();
    }
    None
}

/// Keeps the task until a stop signal or its end; refreshes the token file
/// with each token tether pushes. False when the task ended on its own.
async fn hold(
    tasks: &mut tether::client::task::TaskClient,
    task_id: &str,
    token_file: Option<&Path>,
    stop: impl Future<Output = ()>,
) -> Result<bool> {
    let mut stream = tasks
        .watch(task_id.to_owned())
        .await
        .context("watching the task")?;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(true),
            message = tasks.next(&mut stream) => match message {
                Ok(Some(token)) => {
                    if let Some(file) = token_file {
                        write_token(file, &token.token)?;
                    }
                }
                Ok(None) => {
                    println!("task {task_id} ended");
                    return Ok(false);
                }
                Err(e) => {
                    println!("task {task_id} ended: {e}");
                    return Ok(false);
                }
            },
        }
    }
}

/// `present`: one call with someone else's token.
async fn present(
    link: &Link,
    token_file: &Path,
    tool: Option<String>,
    args: Vec<(String, String)>,
    publish_url: Option<String>,
) -> Result<bool> {
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("reading {}", token_file.display()))?;
    let token = token.trim();
    if let Some(url) = publish_url {
        let response = reqwest::Client::new()
            .post(&url)
            .bearer_auth(token)
            .json(&serde_json::json!({ "id": "q3-summary", "title": "forwarded", "text": "forwarded" }))
            .send()
            .await
            .with_context(|| format!("posting to {url}"))?;
        let status = response.status();
        let challenge = response
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response.text().await.unwrap_or_default();
        let outcome = if status.is_success() {
            Outcome::Ok(body)
        } else {
            Outcome::Refused(status.as_u16(), challenge)
        };
        return Ok(report("POST /publish", &outcome));
    }
    let tool = tool.context("--tool or --publish-url is required")?;
    let client = match connect(link, token).await {
        Ok(client) => client,
        Err(e) => {
            println!("{tool} -> {e:#}");
            return Ok(false);
        }
    };
    let pairs: Vec<(&str, &str)> = args.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let outcome = call(&client, &tool, &pairs).await;
    client.cancel().await.ok();
    Ok(report(&tool, &outcome))
}

/// Writes the token readable by this user only, replacing the file whole.
/// The partial file is created anew (never opened through a link someone
/// left in its place), then renamed over the token file.
fn write_token(file: &Path, token: &str) -> Result<()> {
    let partial = file.with_extension("partial");
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", partial.display())),
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    out.write_all(token.as_bytes())?;
    out.sync_all()?;
    std::fs::rename(&partial, file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn time_of(ms: i64) -> String {
    u64::try_from(ms).map_or_else(
        |_| ms.to_string(),
        |ms| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
    )
}
