//! Everything that speaks Cedar: the compiled-in schema, reading and
//! validating a directory of policy files into a [`Snapshot`], and
//! answering one request against it.
//!
//! Request data reaches Cedar only through its value constructors
//! (`EntityId::new`, `RestrictedExpression::new_string`, ...), so a SPIFFE
//! ID or tool name with quotes, `::` or `/` is just a string.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use aws_lc_rs::digest;
use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, Response, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use super::{
    Decision, OwnedResource, PolicyError, PolicyProblem, PolicyRequest, PolicySummary, Resource,
};

/// The contract, compiled in.
pub(super) const SCHEMA: &str = include_str!("schema.cedarschema");
/// Largest policy file read, in bytes.
pub(super) const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most policy files read from one directory.
pub(super) const MAX_FILES: usize = 1024;

/// What a policy file must end with.
const EXTENSION: &str = "cedar";

/// The schema and what evaluation needs besides the policies; built once
/// per [`super::Policy`].
pub(super) struct Engine {
    schema: Schema,
    validator: Validator,
    authorizer: Authorizer,
    /// The schema's action entities, the base of every request's entities.
    actions: Entities,
    workload: EntityTypeName,
    audience: EntityTypeName,
    tool: EntityTypeName,
    action: EntityTypeName,
}

/// One loaded policy set, never changed after it is built.
pub(super) struct Snapshot {
    set: PolicySet,
    /// `@reason` annotations by policy id, quoted in denials.
    reasons: HashMap<String, String>,
    pub(super) summary: PolicySummary,
    /// SHA-256 over the files' names and contents, for the watcher.
    pub(super) digest: Digest,
}

/// A SHA-256 over a directory's policy files.
pub(super) type Digest = [u8; 32];

/// A policy file as read.
pub(super) struct SourceFile {
    /// The directory joined with the file name.
    path: PathBuf,
    /// The file name (`base.cedar`), the prefix of unnamed policies' ids.
    name: String,
    text: String,
}

// === impl Engine ===

impl Engine {
    /// Parses the built-in schema.
    pub(super) fn new() -> Result<Self, PolicyError> {
        let (schema, warnings) = Schema::from_cedarschema_str(SCHEMA).map_err(schema_error)?;
        for warning in warnings {
            tracing::debug!(%warning, "policy schema warning");
        }
        let name = |n: &str| EntityTypeName::from_str(n).map_err(schema_error);
        Ok(Self {
            validator: Validator::new(schema.clone()),
            actions: schema.action_entities().map_err(schema_error)?,
            schema,
            authorizer: Authorizer::new(),
            workload: name("Workload")?,
            audience: name("Audience")?,
            tool: name("Tool")?,
            action: name("Action")?,
        })
    }

    /// Reads, parses and validates every policy file in `dir`.
    pub(super) fn load_dir(&self, dir: &Path) -> Result<Snapshot, PolicyError> {
        let files = read_dir(dir)?;
        self.compile(&files)
    }

    /// Parses and validates the files as one policy set, reporting every
    /// problem found (not just the first).
    pub(super) fn compile(&self, files: &[SourceFile]) -> Result<Snapshot, PolicyError> {
        let mut parsed = Parsed::default();
        for index in 0..files.len() {
            parsed.add_file(files, index);
        }
        let Parsed {
            set,
            ids,
            reasons,
            origin,
            mut problems,
        } = parsed;
        let result = self.validator.validate(&set, ValidationMode::Strict);
        let locate = |id: &PolicyId| origin.get(AsRef::<str>::as_ref(id)).map(|&i| &files[i]);
        for error in result.validation_errors() {
            if let Some(file) = locate(error.policy_id()) {
                problems.push(file.problem_from(error, error));
            }
        }
        if !problems.is_empty() {
            problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            // The validator reports an expression once per action the
            // policy applies to: one line per place is enough.
            problems.dedup_by(|b, a| (&a.file, a.line, a.column) == (&b.file, b.line, b.column));
            return Err(PolicyError::Invalid { problems });
        }
        let warnings = result
            .validation_warnings()
            .filter_map(|w| locate(w.policy_id()).map(|file| file.problem_from(w, w)))
            .collect();
        Ok(Snapshot {
            set,
            reasons,
            summary: PolicySummary {
                files: files.len(),
                policies: ids.len(),
                ids,
                warnings,
            },
            digest: digest_of(files),
        })
    }

    /// Answers one request (already within bounds) against `snapshot`.
    pub(super) fn evaluate(
        &self,
        snapshot: &Snapshot,
        request: &PolicyRequest<'_>,
        hour: u8,
    ) -> Decision {
        let (cedar_request, entities) = match self.request(request, hour) {
            Ok(built) => built,
            Err(reason) => {
                return Decision::Deny {
                    policies: Vec::new(),
                    reason,
                };
            }
        };
        let response = self
            .authorizer
            .is_authorized(&cedar_request, &snapshot.set, &entities);
        decide(snapshot, &cedar_request, &response)
    }

    /// The Cedar request and entities for `request`, checked against the
    /// schema. An error is the reason to deny.
    fn request(
        &self,
        request: &PolicyRequest<'_>,
        hour: u8,
    ) -> Result<(Request, Entities), String> {
        let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let strings =
            |values: &[String]| RestrictedExpression::new_set(values.iter().map(|v| string(v)));
        let principal = EntityUid::from_type_name_and_id(
            self.workload.clone(),
            EntityId::new(request.principal.to_string()),
        );
        let workload = Entity::new(
            principal.clone(),
            HashMap::from([
                (
                    "trust_domain".to_owned(),
                    string(request.principal.trust_domain_name()),
                ),
                ("path".to_owned(), string(request.principal.path())),
                ("selectors".to_owned(), strings(request.selectors)),
            ]),
            HashSet::new(),
        )
        .map_err(|e| format!("the principal does not fit the policy schema: {e}"))?;
        let resource = match request.resource {
            Resource::Audience(name) => {
                EntityUid::from_type_name_and_id(self.audience.clone(), EntityId::new(name))
            }
            Resource::Tool(name) => {
                EntityUid::from_type_name_and_id(self.tool.clone(), EntityId::new(name))
            }
        };
        let action = EntityUid::from_type_name_and_id(
            self.action.clone(),
            EntityId::new(request.action.as_str()),
        );
        let c = &request.context;
        let context = Context::from_pairs([
            ("intent".to_owned(), string(c.intent)),
            ("tools".to_owned(), strings(c.tools)),
            (
                "ttl_seconds".to_owned(),
                RestrictedExpression::new_long(c.ttl_seconds),
            ),
            ("actors".to_owned(), strings(c.actors)),
            (
                "uid".to_owned(),
                RestrictedExpression::new_long(i64::from(c.uid)),
            ),
            ("executable".to_owned(), string(c.executable)),
            (
                "hour".to_owned(),
                RestrictedExpression::new_long(i64::from(hour)),
            ),
            ("audience".to_owned(), string(c.audience)),
        ])
        .map_err(|e| format!("the context does not fit the policy schema: {e}"))?;
        // Built here from typed values, so the schema conformance pass
        // (the most expensive step of a request) is skipped; the request
        // and context are still checked against the schema below.
        let entities = self
            .actions
            .clone()
            .add_entities(
                [
                    workload,
                    Entity::new_no_attrs(resource.clone(), HashSet::new()),
                ],
                None,
            )
            .map_err(|e| format!("the request's entities are not usable: {e}"))?;
        let cedar_request = Request::new(principal, action, resource, context, Some(&self.schema))
            .map_err(|e| format!("the request does not fit the policy schema: {e}"))?;
        Ok((cedar_request, entities))
    }
}

/// Maps Cedar's response to a decision, failing closed on any error.
fn decide(snapshot: &Snapshot, request: &Request, response: &Response) -> Decision {
    let diagnostics = response.diagnostics();
    let failed: BTreeMap<String, String> = diagnostics
        .errors()
        .map(
            |cedar_policy::AuthorizationError::PolicyEvaluationError(e)| {
                (e.policy_id().to_string(), e.inner().to_string())
            },
        )
        .collect();
    if !failed.is_empty() {
        let reason = failed
            .iter()
            .map(|(id, error)| format!("policy {id} failed on this request: {error}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Decision::Deny {
            policies: failed.into_keys().collect(),
            reason,
        };
    }
    let policies: Vec<String> = diagnostics
        .reason()
        .map(ToString::to_string)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    match response.decision() {
        cedar_policy::Decision::Allow => Decision::Allow { policies },
        cedar_policy::Decision::Deny if policies.is_empty() => {
            let entity =
                |uid: Option<&EntityUid>| uid.map_or_else(String::new, ToString::to_string);
            Decision::Deny {
                policies,
                reason: format!(
                    "no policy permits {} for {} on {}",
                    entity(request.action()),
                    entity(request.principal()),
                    entity(request.resource())
                ),
            }
        }
        cedar_policy::Decision::Deny => {
            let named = policies
                .iter()
                .map(|id| match snapshot.reasons.get(id) {
                    Some(why) => format!("{id}: {why}"),
                    None => id.clone(),
                })
                .collect::<Vec<_>>()
                .join("; ");
            Decision::Deny {
                reason: format!("forbidden by {named}"),
                policies,
            }
        }
    }
}

/// The policies of several files, renamed to their ids, before validation.
#[derive(Default)]
struct Parsed {
    set: PolicySet,
    /// In file order.
    ids: Vec<String>,
    /// `@reason` annotations by id.
    reasons: HashMap<String, String>,
    /// Policy id -> index of the file it came from.
    origin: HashMap<String, usize>,
    problems: Vec<PolicyProblem>,
}

// === impl Parsed ===

impl Parsed {
    /// Adds the policies of `files[index]`, or its problems.
    fn add_file(&mut self, files: &[SourceFile], index: usize) {
        let file = &files[index];
        let parsed = match PolicySet::from_str(&file.text) {
            Ok(parsed) => parsed,
            Err(errors) => {
                let problems = errors.iter().map(|e| file.problem_from(e, e));
                self.problems.extend(problems);
                return;
            }
        };
        for template in parsed.templates() {
            self.problems.push(file.problem_at_text(
                &template.to_string(),
                "templates (?principal, ?resource) are not supported: name the entities".into(),
            ));
        }
        for policy in parsed.policies() {
            let text = policy.to_string();
            let id = match policy.annotation("id") {
                Some("") => {
                    let problem = file.problem_at_text(&text, "@id must not be empty".into());
                    self.problems.push(problem);
                    continue;
                }
                Some(id) => id.to_owned(),
                None => format!("{}:{}", file.name, policy.id()),
            };
            if let Some(&first) = self.origin.get(&id) {
                let first = files[first].path.display();
                let reason = format!("duplicate policy id {id:?} (first in {first})");
                self.problems.push(file.problem_at_text(&text, reason));
                continue;
            }
            // Ids are unique here, so adding cannot fail; if it did, the
            // policy must not be silently dropped.
            if let Err(e) = self.set.add(policy.new_id(PolicyId::new(&id))) {
                self.problems
                    .push(file.problem_at_text(&text, e.to_string()));
                continue;
            }
            if let Some(reason) = policy.annotation("reason") {
                self.reasons.insert(id.clone(), reason.to_owned());
            }
            self.origin.insert(id.clone(), index);
            self.ids.push(id);
        }
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// No policy directory: nothing is loaded and evaluation allows.
    pub(super) fn permit_all() -> Self {
        Self {
            set: PolicySet::new(),
            reasons: HashMap::new(),
            summary: PolicySummary::empty(),
            digest: [0; 32],
        }
    }
}

// === impl SourceFile ===

impl SourceFile {
    /// A problem located by the diagnostic's primary label (byte offsets
    /// into this file), with its label text and help appended.
    fn problem_from(
        &self,
        diagnostic: &dyn Diagnostic,
        message: &dyn std::fmt::Display,
    ) -> PolicyProblem {
        let labels: Vec<_> = diagnostic.labels().into_iter().flatten().collect();
        let primary = labels.iter().find(|l| l.primary()).or(labels.first());
        let mut reason = message.to_string();
        if let Some(label) = primary.and_then(|l| l.label()) {
            reason = format!("{reason}: {label}");
        }
        if let Some(help) = diagnostic.help() {
            reason = format!("{reason} ({help})");
        }
        self.problem_at(primary.map_or(0, |l| l.offset()), reason)
    }

    /// A problem at the start of `snippet` (a policy's own text) in this
    /// file, or at its top when the text cannot be found.
    fn problem_at_text(&self, snippet: &str, reason: String) -> PolicyProblem {
        self.problem_at(self.text.find(snippet).unwrap_or(0), reason)
    }

    fn problem_at(&self, offset: usize, reason: String) -> PolicyProblem {
        let (line, column) = line_column(&self.text, offset);
        PolicyProblem {
            file: self.path.clone(),
            line,
            column,
            reason,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The `*.cedar` files of `dir`, sorted by name. Hidden files are skipped
/// (editors' and Kubernetes' `..data`); symlinks are followed.
pub(super) fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, PolicyError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |source| PolicyError::Read { path, source }
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_error(dir))? {
        let entry = entry.map_err(read_error(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let is_policy = Path::new(&name).extension().is_some_and(|e| e == EXTENSION);
        if !is_policy || name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: a dangling one is an error, a directory skipped.
        if !fs::metadata(&path).map_err(read_error(&path))?.is_file() {
            continue;
        }
        names.push(name);
        if names.len() > MAX_FILES {
            return Err(PolicyError::TooManyFiles {
                dir: dir.to_owned(),
            });
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let file = fs::File::open(&path).map_err(read_error(&path))?;
            let mut text = String::new();
            // One byte over the limit tells a too-large file from a full one.
            file.take(MAX_FILE_BYTES + 1)
                .read_to_string(&mut text)
                .map_err(read_error(&path))?;
            if text.len() as u64 > MAX_FILE_BYTES {
                let size = fs::metadata(&path).map_or(text.len() as u64, |m| m.len());
                return Err(PolicyError::FileTooLarge { path, size });
            }
            Ok(SourceFile { path, name, text })
        })
        .collect()
}

/// SHA-256 over each file's name and contents, length-prefixed so that no
/// two different directories hash alike.
pub(super) fn digest_of(files: &[SourceFile]) -> Digest {
    let mut context = digest::Context::new(&digest::SHA256);
    for file in files {
        for part in [file.name.as_bytes(), file.text.as_bytes()] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
    }
    let mut out = [0; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// `Audience::"..."` or `Tool::"..."`, through Cedar's own parser.
pub(super) fn parse_resource(input: &str) -> Result<OwnedResource, PolicyError> {
    let uid = EntityUid::from_str(input).map_err(|source| PolicyError::ResourceSyntax {
        input: input.to_owned(),
        source: Box::new(source),
    })?;
    let name = uid.id().unescaped().to_owned();
    match uid.type_name().to_string().as_str() {
        "Audience" => Ok(OwnedResource::Audience(name)),
        "Tool" => Ok(OwnedResource::Tool(name)),
        other => Err(PolicyError::ResourceType {
            input: input.to_owned(),
            found: other.to_owned(),
        }),
    }
}

fn schema_error(source: impl std::error::Error + Send + Sync + 'static) -> PolicyError {
    PolicyError::Schema {
        source: Box::new(source),
    }
}
