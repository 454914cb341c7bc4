//! Policy behaviour through the public API: real files in a temporary
//! directory, real Cedar evaluation. Timeouts are failure guards only.

use std::path::Path;
use std::time::Duration;

use spiffe::SpiffeId;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use super::cedar::{SCHEMA, line_column};
use super::*;

const PLANNER: &str = "spiffe://example.org/agent/planner";
const JIRA: &str = "spiffe://example.org/mcp/jira";

/// A directory holding `files` (name, contents).
fn dir_with(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Puts `text` in `dir/name` in one step (a hidden file renamed into
/// place), as a polling watcher must see it: a plain write may be read
/// half done, empty or cut.
fn replace_file(dir: &Path, name: &str, text: &str) {
    let hidden = dir.join(format!(".{name}.tmp"));
    std::fs::write(&hidden, text).unwrap();
    std::fs::rename(&hidden, dir.join(name)).unwrap();
}

fn config(dir: &Path) -> PolicyConfig {
    PolicyConfig {
        dir: Some(dir.to_owned()),
        ..PolicyConfig::default()
    }
}

fn load(files: &[(&str, &str)]) -> (TempDir, Policy) {
    let dir = dir_with(files);
    let policy = Policy::load(&config(dir.path())).unwrap();
    (dir, policy.with_clock(|| 10))
}

fn load_error(files: &[(&str, &str)]) -> (TempDir, Vec<PolicyProblem>) {
    let dir = dir_with(files);
    let error = Policy::load(&config(dir.path())).unwrap_err();
    let problems = error.problems().to_vec();
    assert!(!problems.is_empty(), "{error}");
    (dir, problems)
}

/// Owned request parts, borrowed into a [`PolicyRequest`] by `ask`.
struct Ask {
    principal: SpiffeId,
    selectors: Vec<String>,
    action: Action,
    resource: OwnedResource,
    intent: String,
    tools: Vec<String>,
    ttl_seconds: i64,
    actors: Vec<String>,
    audience: String,
}

impl Ask {
    fn new(principal: &str, action: Action, resource: OwnedResource) -> Self {
        let audience = match &resource {
            OwnedResource::Audience(a) => a.clone(),
            OwnedResource::Tool(_) => String::new(),
        };
        Self {
            principal: SpiffeId::new(principal).unwrap(),
            selectors: vec!["unix:uid:1000".into()],
            action,
            resource,
            intent: "triage".into(),
            tools: Vec::new(),
            ttl_seconds: 300,
            actors: Vec::new(),
            audience,
        }
    }

    fn begin(principal: &str, audience: &str) -> Self {
        Self::new(
            principal,
            Action::BeginTask,
            OwnedResource::Audience(audience.into()),
        )
    }

    fn tools(mut self, tools: &[&str]) -> Self {
        self.tools = tools.iter().map(|t| (*t).to_owned()).collect();
        self
    }

    fn ask(&self, policy: &Policy) -> Decision {
        policy.evaluate(&PolicyRequest {
            principal: &self.principal,
            selectors: &self.selectors,
            action: self.action,
            resource: self.resource.as_resource(),
            context: PolicyContext {
                intent: &self.intent,
                tools: &self.tools,
                ttl_seconds: self.ttl_seconds,
                actors: &self.actors,
                uid: 1000,
                executable: "/usr/bin/agent",
                audience: &self.audience,
            },
        })
    }
}

fn allow(ids: &[&str]) -> Decision {
    Decision::Allow {
        policies: ids.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn denied_by(decision: &Decision) -> (Vec<String>, String) {
    match decision {
        Decision::Deny { policies, reason } => (policies.clone(), reason.clone()),
        Decision::Allow { .. } => panic!("expected a denial, got {decision:?}"),
    }
}

const BASIC: &str = r#"
@id("planner-begins-tasks")
permit(principal == Workload::"spiffe://example.org/agent/planner",
       action == Action::"BeginTask", resource);

@id("agents-begin-tasks")
permit(principal, action == Action::"BeginTask", resource)
when { principal.path like "/agent/*" };

@id("no-shell")
@reason("shell access is never delegated")
forbid(principal, action == Action::"BeginTask", resource)
when { context.tools.contains("shell.exec") };
"#;

#[test]
fn the_built_in_schema_parses() {
    assert!(SCHEMA.contains("entity Workload"));
    let (_dir, policy) = load(&[]);
    assert!(policy.is_enforcing());
    assert_eq!(policy.summary().files, 0);
}

#[test]
fn permits_name_their_ids_and_nothing_else_is_allowed() {
    let (_dir, policy) = load(&[("basic.cedar", BASIC)]);
    assert_eq!(
        policy.summary().ids,
        ["planner-begins-tasks", "agents-begin-tasks", "no-shell"]
    );
    assert_eq!(
        Ask::begin(PLANNER, JIRA).ask(&policy),
        allow(&["agents-begin-tasks", "planner-begins-tasks"])
    );
    assert_eq!(
        Ask::begin("spiffe://example.org/agent/other", JIRA).ask(&policy),
        allow(&["agents-begin-tasks"])
    );
    // Default deny: no permit matches a workload outside /agent/, nor an
    // action nobody permitted.
    let (policies, reason) = denied_by(&Ask::begin("spiffe://example.org/web", JIRA).ask(&policy));
    assert!(policies.is_empty());
    assert_eq!(
        reason,
        r#"no policy permits Action::"BeginTask" for Workload::"spiffe://example.org/web" on Audience::"spiffe://example.org/mcp/jira""#
    );
    let fetch = Ask::new(
        PLANNER,
        Action::FetchJwtSvid,
        OwnedResource::Audience(JIRA.into()),
    );
    assert!(!fetch.ask(&policy).is_allow());
}

#[test]
fn a_forbid_naming_a_tool_wins_and_is_named() {
    let (_dir, policy) = load(&[("basic.cedar", BASIC)]);
    let (policies, reason) = denied_by(
        &Ask::begin(PLANNER, JIRA)
            .tools(&["jira.read", "shell.exec"])
            .ask(&policy),
    );
    assert_eq!(policies, ["no-shell"]);
    assert_eq!(
        reason,
        "forbidden by no-shell: shell access is never delegated"
    );
    assert!(
        Ask::begin(PLANNER, JIRA)
            .tools(&["jira.read"])
            .ask(&policy)
            .is_allow()
    );
}

#[test]
fn use_tool_is_decided_on_the_tool_with_the_audience_in_the_context() {
    let (_dir, policy) = load(&[(
        "tools.cedar",
        r#"
        @id("jira-tools-for-jira")
        permit(principal, action == Action::"UseTool",
               resource)
        when {
          resource in [Tool::"jira.read", Tool::"jira.search"] &&
          context.audience == "spiffe://example.org/mcp/jira"
        };
        "#,
    )]);
    let use_tool = |tool: &str, audience: &str| {
        let mut ask = Ask::new(PLANNER, Action::UseTool, OwnedResource::Tool(tool.into()));
        ask.audience = audience.into();
        ask.ask(&policy)
    };
    assert_eq!(use_tool("jira.read", JIRA), allow(&["jira-tools-for-jira"]));
    assert!(!use_tool("jira.delete", JIRA).is_allow());
    assert!(!use_tool("jira.read", "spiffe://example.org/mcp/other").is_allow());
    // A tool is not an audience: the same name as an Audience is refused
    // for UseTool by the schema, so it is a denial, not a panic.
    let wrong = Ask::new(
        PLANNER,
        Action::UseTool,
        OwnedResource::Audience("jira.read".into()),
    );
    let (_, reason) = denied_by(&wrong.ask(&policy));
    assert!(reason.contains("schema"), "{reason}");
}

#[test]
fn hours_come_from_the_injected_clock() {
    let dir = dir_with(&[(
        "hours.cedar",
        r#"
        @id("tasks") permit(principal, action, resource);
        @id("after-hours")
        forbid(principal, action == Action::"BeginTask", resource)
        when { context.hour < 8 || context.hour >= 20 };
        "#,
    )]);
    let policy = Policy::load(&config(dir.path())).unwrap();
    let ask = Ask::begin(PLANNER, JIRA);
    assert_eq!(ask.ask(&policy.clone().with_clock(|| 9)), allow(&["tasks"]));
    let (policies, reason) = denied_by(&ask.ask(&policy.clone().with_clock(|| 22)));
    assert_eq!(policies, ["after-hours"]);
    assert_eq!(reason, "forbidden by after-hours");
    assert!(!ask.ask(&policy.with_clock(|| 7)).is_allow());
}

#[test]
fn a_policy_erroring_on_the_request_denies_naming_it() {
    // Cedar alone would skip an erroring forbid and allow: tether does not.
    let (_dir, policy) = load(&[(
        "overflow.cedar",
        r#"
        @id("all") permit(principal, action, resource);
        @id("ttl-math")
        forbid(principal, action, resource)
        when { context.ttl_seconds * 1000 > 3600000 };
        "#,
    )]);
    let mut ask = Ask::begin(PLANNER, JIRA);
    assert!(ask.ask(&policy).is_allow());
    ask.ttl_seconds = i64::MAX;
    let (policies, reason) = denied_by(&ask.ask(&policy));
    assert_eq!(policies, ["ttl-math"]);
    assert!(
        reason.starts_with("policy ttl-math failed on this request: "),
        "{reason}"
    );
}

#[test]
fn unnamed_policies_are_named_by_file() {
    let (_dir, policy) = load(&[
        ("a.cedar", "permit(principal, action, resource);"),
        (
            "b.cedar",
            "forbid(principal, action, resource) when { context.uid == 0 };\n@id(\"x\") permit(principal, action, resource);",
        ),
    ]);
    assert_eq!(
        policy.summary().ids,
        ["a.cedar:policy0", "b.cedar:policy0", "x"]
    );
    assert_eq!(policy.summary().files, 2);
    assert_eq!(
        Ask::begin(PLANNER, JIRA).ask(&policy),
        allow(&["a.cedar:policy0", "x"])
    );
}

#[test]
fn only_visible_cedar_files_are_read_in_name_order() {
    let (_dir, policy) = load(&[
        (
            "20-b.cedar",
            "@id(\"b\") permit(principal, action, resource);",
        ),
        (
            "10-a.cedar",
            "@id(\"a\") permit(principal, action, resource);",
        ),
        (".hidden.cedar", "this is not cedar"),
        ("notes.txt", "this is not cedar either"),
        ("base.cedar.swp", "nor this"),
    ]);
    assert_eq!(policy.summary().ids, ["a", "b"]);
}

#[test]
fn syntax_errors_name_file_line_and_column() {
    let (dir, problems) = load_error(&[
        ("good.cedar", "permit(principal, action, resource);"),
        (
            "broken.cedar",
            "// a comment\npermit(principal, action, resource)\n  when { context.tools.contains(\"x\") && };\n",
        ),
    ]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let problem = &problems[0];
    assert_eq!(problem.file, dir.path().join("broken.cedar"));
    assert_eq!((problem.line, problem.column), (3, 41));
    assert!(problem.reason.contains("unexpected token `}`"), "{problem}");
    assert!(
        problem.to_string().starts_with(&format!(
            "{}:3:41: ",
            dir.path().join("broken.cedar").display()
        )),
        "{problem}"
    );
}

#[test]
fn unknown_attributes_and_entity_types_are_refused_in_strict_mode() {
    let (dir, problems) = load_error(&[
        (
            "attr.cedar",
            "@id(\"nope\")\npermit(principal, action, resource)\nwhen { principal.nope == \"x\" };\n",
        ),
        (
            "type.cedar",
            "\n\n@id(\"foo\") permit(principal, action, resource == Foo::\"x\");\n",
        ),
        (
            "context.cedar",
            "@id(\"ctx\") permit(principal, action, resource) when { context.tool == \"x\" };",
        ),
    ]);
    let at = |name: &str| {
        problems
            .iter()
            .find(|p| p.file == dir.path().join(name))
            .unwrap_or_else(|| panic!("no problem in {name}: {problems:?}"))
    };
    let attr = at("attr.cedar");
    assert_eq!((attr.line, attr.column), (3, 8), "{attr}");
    assert!(attr.reason.contains("attribute `nope`"), "{attr}");
    assert!(attr.reason.contains("for policy `nope`"), "{attr}");
    let unknown = at("type.cedar");
    assert_eq!(unknown.line, 3, "{unknown}");
    assert!(
        unknown.reason.contains("unrecognized entity type `Foo`"),
        "{unknown}"
    );
    let context = at("context.cedar");
    assert!(context.reason.contains("tool"), "{context}");
    // The error as one line names every problem.
    let dir_path = dir.path().to_owned();
    let error = Policy::load(&config(&dir_path)).unwrap_err();
    assert_eq!(error.to_string().matches(".cedar:").count(), problems.len());
}

#[test]
fn ambiguous_sets_are_refused() {
    let (_dir, problems) = load_error(&[
        (
            "a.cedar",
            "@id(\"same\") permit(principal, action, resource);",
        ),
        (
            "b.cedar",
            "\n@id(\"same\") permit(principal, action, resource);\n@id(\"\") permit(principal, action, resource);\npermit(principal == ?principal, action, resource);",
        ),
    ]);
    let reasons: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("b.cedar:2:1: duplicate policy id \"same\""),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("b.cedar:3:1: @id must not be empty"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("b.cedar:4:1: templates"), "{reasons:?}");
}

#[test]
fn a_failed_reload_keeps_the_policies_in_force() {
    let (dir, policy) = load(&[(
        "p.cedar",
        "@id(\"v1\") permit(principal, action, resource);",
    )]);
    let ask = Ask::begin(PLANNER, JIRA);
    assert_eq!(ask.ask(&policy), allow(&["v1"]));

    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"v2\") permit(principal, action, resource) when { principal.nope };",
    )
    .unwrap();
    let error = policy.reload().unwrap_err();
    assert!(error.to_string().contains("p.cedar:1:"), "{error}");
    assert_eq!(ask.ask(&policy), allow(&["v1"]));
    assert_eq!(policy.summary().ids, ["v1"]);

    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"v3\") permit(principal, action, resource);",
    )
    .unwrap();
    let summary = policy.reload().unwrap();
    assert_eq!(summary.ids, ["v3"]);
    // Every clone sees the new set.
    assert_eq!(ask.ask(&policy.clone()), allow(&["v3"]));

    // A directory that disappears is an error too, and changes nothing.
    drop(dir);
    assert!(matches!(policy.reload(), Err(PolicyError::Read { .. })));
    assert_eq!(ask.ask(&policy), allow(&["v3"]));
}

#[tokio::test]
async fn the_watcher_reloads_changed_files_and_reports_refusals() {
    let dir = dir_with(&[(
        "p.cedar",
        "@id(\"v1\") permit(principal, action, resource);",
    )]);
    let policy = Policy::load(&PolicyConfig {
        dir: Some(dir.path().to_owned()),
        poll_interval: Duration::from_millis(20),
    })
    .unwrap();
    let (reports, mut received) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let watcher = tokio::spawn(policy.clone().run_watcher(
        move |outcome| reports.send(outcome).unwrap(),
        cancel.clone(),
    ));
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), received.recv())
            .await
            .expect("the watcher reports within 10s")
            .unwrap()
    };
    let ask = Ask::begin(PLANNER, JIRA);

    replace_file(
        dir.path(),
        "p.cedar",
        "@id(\"v2\") permit(principal, action, resource);",
    );
    let summary = next().await.unwrap();
    assert_eq!(summary.ids, ["v2"]);
    assert_eq!(ask.ask(&policy), allow(&["v2"]));

    replace_file(dir.path(), "p.cedar", "permit(");
    let refused = next().await.unwrap_err();
    assert!(refused.contains("p.cedar:1:"), "{refused}");
    assert_eq!(ask.ask(&policy), allow(&["v2"]));

    // Two steps: a poll between them sees q.cedar beside the broken
    // p.cedar, a new version refused in turn.
    replace_file(
        dir.path(),
        "q.cedar",
        "@id(\"v3\") permit(principal, action, resource);",
    );
    std::fs::remove_file(dir.path().join("p.cedar")).unwrap();
    let summary = loop {
        match next().await {
            Ok(summary) => break summary,
            Err(refused) => assert!(refused.contains("p.cedar:1:"), "{refused}"),
        }
    };
    assert_eq!(summary.ids, ["v3"]);

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the watcher stops when cancelled")
        .unwrap();
    // The refused version was reported once, not on every poll.
    assert!(received.try_recv().is_err());
}

#[test]
fn odd_strings_are_data_not_syntax() {
    // Audiences and tools with '::', '/', ':' and quotes, a SPIFFE ID with
    // every character its path allows: matched exactly, never parsed.
    let odd_id = "spiffe://ex-am.ple/a.b/C-d_9/x...y";
    let (_dir, policy) = load(&[(
        "odd.cedar",
        r#"
        @id("odd-principal")
        permit(principal == Workload::"spiffe://ex-am.ple/a.b/C-d_9/x...y",
               action == Action::"BeginTask", resource == Audience::"a\"b::c")
        when { context.tools.contains("mcp://srv/tool:\"x\"") };
        @id("odd-tool")
        permit(principal, action == Action::"UseTool", resource == Tool::"ns::tool/\"q\"");
        "#,
    )]);
    let ask = Ask::begin(odd_id, "a\"b::c").tools(&["mcp://srv/tool:\"x\""]);
    assert_eq!(ask.ask(&policy), allow(&["odd-principal"]));
    let near = Ask::begin(odd_id, "a\"b::c").tools(&["mcp://srv/tool:x"]);
    assert!(!near.ask(&policy).is_allow());
    // An injection attempt through the audience is just a name.
    let injected = Ask::begin(odd_id, r#"x" || true || ""#).tools(&["mcp://srv/tool:\"x\""]);
    let (_, reason) = denied_by(&injected.ask(&policy));
    assert!(reason.starts_with("no policy permits"), "{reason}");
    let tool = Ask::new(
        PLANNER,
        Action::UseTool,
        OwnedResource::Tool("ns::tool/\"q\"".into()),
    );
    assert_eq!(tool.ask(&policy), allow(&["odd-tool"]));
    let control = Ask::begin(PLANNER, "tab\there\u{0}nul").tools(&["\u{1b}[2J"]);
    assert!(!control.ask(&policy).is_allow());
}

#[test]
fn oversized_requests_are_denied_before_evaluation() {
    let (_dir, policy) = load(&[(
        "all.cedar",
        "@id(\"all\") permit(principal, action, resource);",
    )]);
    let many: Vec<String> = (0..=MAX_TOOLS).map(|i| format!("tool{i}")).collect();
    let mut ask = Ask::begin(PLANNER, JIRA);
    ask.tools = many;
    let (policies, reason) = denied_by(&ask.ask(&policy));
    assert!(policies.is_empty());
    assert_eq!(reason, "context too large: 257 tools (at most 256)");

    let mut ask = Ask::begin(PLANNER, JIRA);
    ask.intent = "x".repeat(MAX_INTENT_BYTES + 1);
    let (_, reason) = denied_by(&ask.ask(&policy));
    assert_eq!(
        reason,
        "context too large: the intent is 8193 bytes (at most 8192)"
    );

    let mut ask = Ask::begin(PLANNER, JIRA);
    ask.actors = vec!["a".repeat(MAX_VALUE_BYTES + 1)];
    assert!(!ask.ask(&policy).is_allow());
    let mut ask = Ask::begin(PLANNER, &"a".repeat(MAX_VALUE_BYTES + 1));
    ask.audience = String::new();
    assert!(!ask.ask(&policy).is_allow());

    // At the limits: allowed.
    let mut ask = Ask::begin(PLANNER, JIRA);
    ask.tools = (0..MAX_TOOLS).map(|i| format!("tool{i}")).collect();
    ask.intent = "x".repeat(MAX_INTENT_BYTES);
    assert_eq!(ask.ask(&policy), allow(&["all"]));
}

#[test]
fn without_a_directory_everything_is_allowed() {
    let policy = Policy::load(&PolicyConfig::default()).unwrap();
    assert!(!policy.is_enforcing());
    assert_eq!(Ask::begin(PLANNER, JIRA).ask(&policy), allow(&[]));
    assert_eq!(policy.reload().unwrap().files, 0);
}

#[test]
fn the_shipped_examples_load_and_decide_as_their_headers_say() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
    let policy = Policy::load(&config(&examples)).unwrap().with_clock(|| 10);
    let summary = policy.summary();
    assert!(summary.files >= 5, "{summary:?}");
    assert!(summary.warnings.is_empty(), "{summary:?}");

    const PLANNER_TD: &str = "spiffe://tether.local/agent/planner";
    const JIRA_TD: &str = "spiffe://tether.local/mcp/jira";
    // base.cedar: any registered workload fetches JWT-SVIDs.
    let fetch = Ask::new(
        "spiffe://tether.local/uid/1000",
        Action::FetchJwtSvid,
        OwnedResource::Audience("anything".into()),
    );
    assert!(fetch.ask(&policy).is_allow());
    // tools.cedar: the planner may begin Jira tasks with Jira tools only.
    let begin = || Ask::begin(PLANNER_TD, JIRA_TD).tools(&["jira.search", "jira.read"]);
    assert!(
        begin().ask(&policy).is_allow(),
        "{:?}",
        begin().ask(&policy)
    );
    assert!(
        !Ask::begin(PLANNER_TD, JIRA_TD)
            .tools(&["jira.delete"])
            .ask(&policy)
            .is_allow()
    );
    assert!(
        !Ask::begin("spiffe://tether.local/agent/other", JIRA_TD)
            .ask(&policy)
            .is_allow()
    );
    // ttl.cedar: at most 15 minutes for Jira.
    let mut long = begin();
    long.ttl_seconds = 3600;
    assert!(!long.ask(&policy).is_allow());
    // hours.cedar: not at night.
    assert!(!begin().ask(&policy.clone().with_clock(|| 23)).is_allow());
    // exchange.cedar: the Jira server exchanges only to the Jira REST API.
    let exchange = |audience: &str| {
        let mut ask = Ask::new(
            JIRA_TD,
            Action::ExchangeToken,
            OwnedResource::Audience(audience.into()),
        );
        ask.actors = vec![JIRA_TD.into()];
        ask.ask(&policy)
    };
    assert!(exchange("https://jira.example.com/rest/api").is_allow());
    assert!(!exchange("https://evil.example.com/").is_allow());
}

#[test]
fn config_validation_names_the_key() {
    assert!(PolicyConfig::default().validate().is_ok());
    let relative = PolicyConfig {
        dir: Some("policies".into()),
        ..PolicyConfig::default()
    };
    assert_eq!(relative.validate().unwrap_err().0, "policy_dir");
    let zero = PolicyConfig {
        poll_interval: Duration::ZERO,
        ..PolicyConfig::default()
    };
    assert_eq!(zero.validate().unwrap_err().0, "policy_poll_interval");
    let parsed: PolicyConfig =
        toml::from_str("dir = \"/etc/tether/policies\"\npoll_interval = \"5s\"").unwrap();
    assert_eq!(parsed.poll_interval, Duration::from_secs(5));
    assert!(toml::from_str::<PolicyConfig>("nope = 1").is_err());
}

#[test]
fn actions_and_resources_parse_from_their_cedar_names() {
    for action in Action::ALL {
        assert_eq!(action.as_str().parse::<Action>().unwrap(), action);
        assert_eq!(
            format!("Action::\"{action}\"").parse::<Action>().unwrap(),
            action
        );
    }
    assert!("beginTask".parse::<Action>().is_err());
    assert_eq!(
        r#"Audience::"spiffe://x/y""#.parse::<OwnedResource>().unwrap(),
        OwnedResource::Audience("spiffe://x/y".into())
    );
    assert_eq!(
        r#"Tool::"a\"b""#.parse::<OwnedResource>().unwrap(),
        OwnedResource::Tool("a\"b".into())
    );
    assert!(matches!(
        r#"Workload::"spiffe://x/y""#.parse::<OwnedResource>(),
        Err(PolicyError::ResourceType { .. })
    ));
    assert!(matches!(
        "spiffe://x/y".parse::<OwnedResource>(),
        Err(PolicyError::ResourceSyntax { .. })
    ));
}

#[test]
fn offsets_become_lines_and_columns() {
    let text = "ab\ncdé\nf";
    let cases = [
        (0, (1, 1)),
        (2, (1, 3)),
        (3, (2, 1)),
        (6, (2, 3)),
        (7, (2, 4)),
        (8, (3, 1)),
        (99, (3, 2)),
    ];
    for (offset, want) in cases {
        assert_eq!(line_column(text, offset), want, "{offset}");
    }
}

#[test]
fn an_unreadable_policy_dir_prints_the_path_and_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("policies");
    let error = Policy::load(&config(&missing)).unwrap_err();
    let text = crate::error::chain(&error);
    assert!(
        text.starts_with(&format!(
            "reading {}: No such file or directory",
            missing.display()
        )),
        "{text}"
    );
    assert_eq!(text.matches("No such file").count(), 1, "{text}");
}
