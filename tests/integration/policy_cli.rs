//! `tether policy validate|check`: the built binary on the shipped
//! examples (`examples/policies`) and on broken copies of them. No agent:
//! the commands work offline. Exit codes and output are the contract.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const PLANNER: &str = "spiffe://tether.local/agent/planner";
const JIRA: &str = "Audience::\"spiffe://tether.local/mcp/jira\"";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies")
}

fn tether(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A copy of the examples in a temporary directory.
fn copy_of_examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// `tether policy check` on the examples, as the planner at 10:00.
fn check(args: &[&str]) -> Output {
    let dir = examples();
    let dir = dir.to_str().unwrap();
    tether(&[&["policy", "check", "--dir", dir], args].concat())
}

#[test]
fn the_examples_validate() {
    let out = tether(&["policy", "validate", examples().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.ends_with(" policies in 5 files: valid\n"),
        "{stdout}"
    );
    assert_eq!(text(&out.stderr), "", "no warnings in the examples");

    let out = tether(&["policy", "validate", "--json", examples().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["files"], 5);
    let ids: Vec<&str> = json["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(ids.contains(&"base-fetch-jwt-svid"), "{ids:?}");
    assert_eq!(json["errors"], serde_json::json!([]));
}

#[test]
fn a_broken_copy_fails_naming_file_line_and_column() {
    let dir = copy_of_examples();
    let ttl = dir.path().join("ttl.cedar");
    let original = std::fs::read_to_string(&ttl).unwrap();
    // Line 12 of ttl.cedar: the first `when`; break it with an attribute
    // the schema does not have.
    let broken = original.replacen(
        "when { context.ttl_seconds > 900 }",
        "when { context.ttl > 900 }",
        1,
    );
    assert_ne!(broken, original);
    std::fs::write(&ttl, &broken).unwrap();
    std::fs::write(
        dir.path().join("zz-syntax.cedar"),
        "permit(principal, action,\n",
    )
    .unwrap();

    let out = tether(&["policy", "validate", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    let line = broken
        .lines()
        .position(|l| l.contains("context.ttl >"))
        .unwrap()
        + 1;
    let column = broken
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("context.ttl")
        .unwrap()
        + 1;
    assert!(
        lines[0].starts_with(&format!("{}:{line}:{column}: ", ttl.display())),
        "{stderr}"
    );
    assert!(lines[0].contains("ttl"), "{stderr}");
    assert!(
        lines[1].starts_with(&format!(
            "{}:1:26: ",
            dir.path().join("zz-syntax.cedar").display()
        )),
        "{stderr}"
    );

    let out = tether(&["policy", "validate", "--json", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["valid"], false);
    assert_eq!(json["errors"][0]["line"], line);
    assert_eq!(json["errors"][0]["column"], column);
    assert_eq!(json["errors"].as_array().unwrap().len(), 2);

    // A directory that does not exist: one line, exit 1.
    let out = tether(&["policy", "validate", "/nonexistent/policies"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("tether: error: reading /nonexistent/policies"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_allows_with_the_permitting_policies() {
    let out = check(&[
        "--principal",
        PLANNER,
        "--action",
        "BeginTask",
        "--resource",
        JIRA,
        "--selector",
        "unix:uid:1000",
        "--context",
        r#"{"intent": "triage", "tools": ["jira.read"], "ttl_seconds": 600, "hour": 10}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "allow (policies: planner-jira-tasks)\n");

    let out = check(&[
        "--principal",
        "spiffe://tether.local/uid/1000",
        "--action",
        "FetchJWTSVID",
        "--resource",
        "Audience::\"anything\"",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"decision": "allow", "policies": ["base-fetch-jwt-svid"], "reason": null})
    );
}

#[test]
fn check_denies_naming_the_forbidding_policies() {
    let out = check(&[
        "--principal",
        PLANNER,
        "--action",
        "BeginTask",
        "--resource",
        JIRA,
        "--context",
        r#"{"tools": ["jira.read"], "ttl_seconds": 600, "hour": 22}"#,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        "deny: forbidden by working-hours: tasks begin only between 08:00 and 20:00 local time (policies: working-hours)\n"
    );

    let out = check(&[
        "--principal",
        PLANNER,
        "--action",
        "BeginTask",
        "--resource",
        JIRA,
        "--context",
        r#"{"tools": ["jira.read"], "ttl_seconds": 1200, "hour": 10}"#,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["decision"], "deny");
    assert_eq!(json["policies"], serde_json::json!(["jira-ttl-15m"]));

    // Nothing permits it: default deny, no policy named.
    let out = check(&[
        "--principal",
        "spiffe://tether.local/mcp/jira",
        "--action",
        "ExchangeToken",
        "--resource",
        "Audience::\"https://evil.example.com/\"",
        "--context",
        r#"{"hour": 10}"#,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        "deny: no policy permits Action::\"ExchangeToken\" for Workload::\"spiffe://tether.local/mcp/jira\" on Audience::\"https://evil.example.com/\"\n"
    );
}

#[test]
fn check_refuses_bad_input_with_usage_errors() {
    let usage = |args: &[&str], code: i32, needle: &str| {
        let out = check(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "");
    };
    let base = ["--principal", PLANNER, "--action", "BeginTask"];
    usage(
        &[&base[..], &["--resource", "Tool::\"x\""]].concat(),
        64,
        "takes an Audience",
    );
    usage(
        &[
            &base[..],
            &["--resource", JIRA, "--context", "{\"nope\": 1}"],
        ]
        .concat(),
        64,
        "unknown field `nope`",
    );
    usage(
        &[
            &base[..],
            &["--resource", JIRA, "--context", "{\"hour\": 24}"],
        ]
        .concat(),
        64,
        "hour 24",
    );
    usage(
        &[&base[..], &["--resource", "Foo::\"x\""]].concat(),
        2,
        "expected Audience or Tool",
    );
    usage(
        &[
            "--principal",
            "not-an-id",
            "--action",
            "BeginTask",
            "--resource",
            JIRA,
        ],
        2,
        "--principal",
    );
    usage(
        &[
            "--principal",
            PLANNER,
            "--action",
            "Begin",
            "--resource",
            JIRA,
        ],
        2,
        "unknown action",
    );
}
