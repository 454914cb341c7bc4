//! `tether policy validate|check`: the agent's own policy loader and
//! evaluator, run offline on a directory (no agent, no socket), so an
//! operator can test a change before the agent's watcher picks it up.
//!
//! Rendering lives in [`super::output`]; located problems go to stderr as
//! `FILE:LINE:COLUMN: reason`, one a line.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use spiffe::SpiffeId;
use thiserror::Error;

use super::output::{Format, PolicyDecisionView, PolicyProblemView, PolicyValidation};
use super::{EXIT_USAGE, fail};
use crate::policy::{
    Action, Decision, OwnedResource, Policy, PolicyConfig, PolicyContext, PolicyError,
    PolicyProblem, PolicyRequest, Resource,
};

/// Arguments of `tether policy`.
#[derive(Debug, Args)]
pub(crate) struct PolicyArgs {
    /// Print JSON on stdout (stable field names, listed in each command's
    /// --help).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Parse every *.cedar file in DIR and validate it against the schema,
    /// as the agent does on load. Exit 0 with "N policies in M files:
    /// valid"; exit 1 with each problem on stderr as FILE:LINE:COLUMN:
    /// reason.
    ///
    /// --json prints {"valid", "files", "policies", "ids", "errors":
    /// [{"file", "line", "column", "reason"}], "warnings": [..]}, when
    /// invalid too.
    Validate(ValidateArgs),
    /// Decide one request against the policies in --dir, as the agent
    /// would. Exit 0 with "allow (policies: ..)"; exit 1 with "deny: reason
    /// (policies: ..)".
    ///
    /// --json prints {"decision": "allow"|"deny", "policies": [..],
    /// "reason" (null when allowed)}.
    Check(CheckArgs),
}

/// Arguments of `tether policy validate`.
#[derive(Debug, Args)]
struct ValidateArgs {
    /// The policy directory.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// Arguments of `tether policy check`.
#[derive(Debug, Args)]
struct CheckArgs {
    /// The policy directory.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    /// The workload's SPIFFE ID.
    #[arg(long, value_name = "SPIFFE_ID")]
    principal: SpiffeId,

    /// BeginTask, RenewTask, ExchangeToken, FetchJWTSVID or UseTool.
    #[arg(long, value_name = "ACTION")]
    action: Action,

    /// The resource in Cedar's syntax: Audience::"<audience>", or
    /// Tool::"<tool>" for UseTool.
    #[arg(long, value_name = "ENTITY")]
    resource: OwnedResource,

    /// A selector of the workload (repeat), as attestation produces them:
    /// unix:uid:1000.
    #[arg(long = "selector", value_name = "SELECTOR")]
    selectors: Vec<String>,

    /// The context record as JSON: {"intent", "tools", "ttl_seconds",
    /// "actors", "uid", "executable", "hour", "audience"}. Missing fields
    /// are empty ("", [], 0), except "hour" (now, in local time) and
    /// "audience" (the resource's audience, as the agent sends it).
    #[arg(long, value_name = "JSON")]
    context: Option<String>,
}

/// The `--context` document.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ContextArg {
    intent: String,
    tools: Vec<String>,
    ttl_seconds: i64,
    actors: Vec<String>,
    uid: u32,
    executable: String,
    hour: Option<u8>,
    audience: Option<String>,
}

/// Why a `policy` command failed.
#[derive(Debug, Error)]
pub(crate) enum PolicyCommandError {
    /// The directory could not be loaded.
    #[error(transparent)]
    Load(#[from] PolicyError),
    /// `--context` is not the context record.
    #[error("--context")]
    Context {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// `--context` names an hour that is not one.
    #[error("--context: hour {0} is not between 0 and 23")]
    Hour(u8),
    /// `--resource` does not fit `--action`.
    #[error("--action {action} takes {expected}::\"..\" resource")]
    ResourceKind {
        /// The action given.
        action: Action,
        /// The entity type it takes, with its article.
        expected: &'static str,
    },
    /// The policies were refused (already printed, one a line).
    #[error("{0} problem(s) in the policies")]
    Invalid(usize),
    /// The request was denied (already printed).
    #[error("denied")]
    Denied,
    /// Printing the result failed.
    #[error("writing to stdout")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

// === impl PolicyCommandError ===

impl PolicyCommandError {
    /// The exit status for this failure (see `cli` for the table).
    fn exit_code(&self) -> u8 {
        match self {
            Self::Context { .. } | Self::Hour(_) | Self::ResourceKind { .. } => EXIT_USAGE,
            _ => 1,
        }
    }
}

/// Runs `tether policy ...`.
pub(crate) fn run(args: &PolicyArgs) -> ExitCode {
    let format = Format::from_json_flag(args.json);
    let result = match &args.command {
        PolicyCommand::Validate(validate_args) => validate(format, validate_args),
        PolicyCommand::Check(check_args) => check(format, check_args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The answer is already on stdout (and the problems on stderr).
        Err(PolicyCommandError::Denied | PolicyCommandError::Invalid(_)) => ExitCode::from(1),
        Err(PolicyCommandError::Stdout { source })
            if source.kind() == io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => fail(error.exit_code(), &error),
    }
}

fn validate(format: Format, args: &ValidateArgs) -> Result<(), PolicyCommandError> {
    let loaded = Policy::load(&PolicyConfig {
        dir: Some(args.dir.clone()),
        ..PolicyConfig::default()
    });
    let (report, errors) = match loaded {
        Ok(policy) => {
            let summary = policy.summary();
            let report = PolicyValidation {
                valid: true,
                files: summary.files,
                policies: summary.policies,
                ids: summary.ids,
                errors: Vec::new(),
                warnings: summary.warnings.iter().map(problem_view).collect(),
            };
            (report, 0)
        }
        Err(PolicyError::Invalid { problems }) => {
            let report = PolicyValidation {
                valid: false,
                files: 0,
                policies: 0,
                ids: Vec::new(),
                errors: problems.iter().map(problem_view).collect(),
                warnings: Vec::new(),
            };
            (report, problems.len())
        }
        Err(other) => return Err(other.into()),
    };
    if format == Format::Readable {
        for warning in &report.warnings {
            eprintln!("{}", warning_line(warning));
        }
        for error in &report.errors {
            eprintln!("{error}");
        }
    }
    if report.valid || format == Format::Json {
        format.print(&report).map_err(stdout)?;
    }
    if errors == 0 {
        Ok(())
    } else {
        Err(PolicyCommandError::Invalid(errors))
    }
}

fn check(format: Format, args: &CheckArgs) -> Result<(), PolicyCommandError> {
    let context: ContextArg = match &args.context {
        Some(json) => {
            serde_json::from_str(json).map_err(|source| PolicyCommandError::Context { source })?
        }
        None => ContextArg::default(),
    };
    let resource = args.resource.as_resource();
    match (args.action, resource) {
        (Action::UseTool, Resource::Audience(_)) => {
            return Err(PolicyCommandError::ResourceKind {
                action: args.action,
                expected: "a Tool",
            });
        }
        (action, Resource::Tool(_)) if action != Action::UseTool => {
            return Err(PolicyCommandError::ResourceKind {
                action,
                expected: "an Audience",
            });
        }
        _ => {}
    }
    let audience = match (&context.audience, resource) {
        (Some(audience), _) => audience.as_str(),
        (None, Resource::Audience(audience)) => audience,
        (None, Resource::Tool(_)) => "",
    };
    let mut policy = Policy::load(&PolicyConfig {
        dir: Some(args.dir.clone()),
        ..PolicyConfig::default()
    })?;
    if let Some(hour) = context.hour {
        if hour > 23 {
            return Err(PolicyCommandError::Hour(hour));
        }
        policy = policy.with_clock(move || hour);
    }
    let decision = policy.evaluate(&PolicyRequest {
        principal: &args.principal,
        selectors: &args.selectors,
        action: args.action,
        resource,
        context: PolicyContext {
            intent: &context.intent,
            tools: &context.tools,
            ttl_seconds: context.ttl_seconds,
            actors: &context.actors,
            uid: context.uid,
            executable: &context.executable,
            audience,
        },
    });
    let (view, allowed) = match decision {
        Decision::Allow { policies } => (
            PolicyDecisionView {
                decision: "allow",
                policies,
                reason: None,
            },
            true,
        ),
        Decision::Deny { policies, reason } => (
            PolicyDecisionView {
                decision: "deny",
                policies,
                reason: Some(reason),
            },
            false,
        ),
    };
    format.print(&view).map_err(stdout)?;
    if allowed {
        Ok(())
    } else {
        Err(PolicyCommandError::Denied)
    }
}

fn problem_view(problem: &PolicyProblem) -> PolicyProblemView {
    PolicyProblemView {
        file: problem.file.clone(),
        line: problem.line,
        column: problem.column,
        reason: problem.reason.clone(),
    }
}

/// `FILE:LINE:COLUMN: warning: reason`.
fn warning_line(warning: &PolicyProblemView) -> String {
    let located = PolicyProblemView {
        reason: format!("warning: {}", warning.reason),
        ..warning.clone()
    };
    located.to_string()
}

fn stdout(source: io::Error) -> PolicyCommandError {
    PolicyCommandError::Stdout { source }
}
