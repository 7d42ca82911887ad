use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use crate::policy;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and compile a profile file; errors give line and column.
    Check { file: PathBuf },
    /// Which rule decides a request for a running sandbox, and why.
    Explain {
        #[arg(long)]
        sandbox: String,
        /// HTTP method.
        #[arg(long, short = 'X', default_value = "GET")]
        method: String,
        /// `https://host[:port]/path` or `http://...`.
        url: String,
        /// Destination address (default: what the sandbox resolved the host to).
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// Request header `name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Request body size in bytes.
        #[arg(long)]
        body_size: Option<u64>,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Run policy unit tests: each `[[case]]` in CASES (method, url, expect,
    /// optional rule, ip, headers, `body_size`) against FILE. Exit 1 if any fails.
    Test { file: PathBuf, cases: PathBuf },
    /// Re-evaluate recorded decisions against another profile and report
    /// what would change.
    Replay {
        /// Profile file to replay against.
        profile: PathBuf,
        /// Only decisions at or after this time: RFC 3339, or a duration ago (`2h`).
        #[arg(long)]
        since: Option<String>,
        /// Decision log to read (default: /var/log/<instance>/decisions.jsonl).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Only this sandbox's decisions.
        #[arg(long)]
        sandbox: Option<String>,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Print the JSON Schema of the profile format.
    Schema,
    /// List the capability bundle library, or print one bundle.
    Bundles { name: Option<String> },
    /// Revoke a capability bundle from every sandbox at once (kept across
    /// daemon restarts until restored).
    Revoke {
        bundle: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Give a revoked bundle back to the sandboxes whose profiles take it.
    Restore {
        bundle: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Read every sandbox's profile file again (as SIGHUP does).
    Reload {
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Print the built-in default profile.
    Default,
    /// Allow a host (name, `*.suffix`, IP or CIDR) for a running sandbox.
    Allow {
        #[arg(long)]
        sandbox: String,
        host: String,
        /// Only these ports (repeatable); default any.
        #[arg(long = "port")]
        ports: Vec<u16>,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Deny a host (name, `*.suffix`, IP or CIDR) for a running sandbox.
    Deny {
        #[arg(long)]
        sandbox: String,
        host: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Remove a rule, by name, from a running sandbox's profile.
    RemoveRule {
        #[arg(long)]
        sandbox: String,
        rule: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Print the profile a running sandbox enforces (TOML, with its origin)
    Show {
        /// Sandbox name.
        #[arg(long)]
        sandbox: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Put a profile in force for a running sandbox, atomically: its next
    /// request (on new and kept-alive connections) is decided by it.
    Set {
        /// Sandbox name.
        #[arg(long)]
        sandbox: String,
        file: PathBuf,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
}

pub async fn run(command: &PolicyCommand) -> anyhow::Result<u8> {
    match command {
        PolicyCommand::Check { file } => {
            let profile = policy::load_profile_untrusted(file)?;
            policy::Policy::compile(&profile)?;
            println!("{}: profile {:?} is valid ({} rules)", file.display(), profile.name, profile.rules.len());
            // Valid, but the daemon would still refuse a file others can
            // change; say so without failing a check run by a non-root user.
            if let Err(untrusted) = policy::load_profile(file) {
                eprintln!("warning: the daemon would refuse this file as it is: {untrusted}");
            }
            Ok(0)
        }
        PolicyCommand::Show { sandbox, instance } => {
            let view = instance.daemon().await?.profile(sandbox).await?;
            println!("# sandbox {sandbox} enforces profile {:?} from {}", view.profile_name, view.origin);
            print!("{}", view.text);
            if !view.text.ends_with('\n') {
                println!();
            }
            Ok(0)
        }
        PolicyCommand::Set { sandbox, file, instance } => {
            // Check here for line and column; the daemon reads the file
            // itself (and again whenever it changes).
            policy::Policy::compile(&policy::load_profile(file)?)?;
            let client = instance.daemon().await?;
            let path = std::path::absolute(file).with_context(|| format!("resolving {}", file.display()))?;
            let source = crate::sandbox::ProfileSource::File { path, text: String::new() };
            let status = client.set_profile(sandbox, &source).await?;
            println!("sandbox {sandbox} now enforces profile {:?} from {}", status.profile_name, file.display());
            Ok(0)
        }
        PolicyCommand::Explain { sandbox, method, url, ip, headers, body_size, instance } => {
            let mut request = crate::control::ExplainRequest {
                method: method.clone(),
                url: url.clone(),
                ip: *ip,
                body_size: *body_size,
                ..Default::default()
            };
            for header in headers {
                let (name, value) =
                    header.split_once(':').with_context(|| format!("header {header:?} is not `name: value`"))?;
                request.headers.insert(name.trim().to_owned(), value.trim().to_owned());
            }
            let explanation = instance.daemon().await?.explain(sandbox, &request).await?;
            print!("{explanation}");
            Ok(0)
        }
        PolicyCommand::Test { file, cases } => test_cases(file, cases),
        PolicyCommand::Replay { profile, since, log, sandbox, instance } => {
            let log =
                log.clone().unwrap_or_else(|| PathBuf::from(format!("/var/log/{}/decisions.jsonl", instance.instance)));
            replay(profile, since.as_deref(), &log, sandbox.as_deref())
        }
        PolicyCommand::Schema => {
            println!("{}", serde_json::to_string_pretty(&policy::json_schema())?);
            Ok(0)
        }
        PolicyCommand::Bundles { name: Some(name) } => {
            let text = policy::bundles::text(name).with_context(|| {
                format!(
                    "no bundle {name:?}; the library has {}",
                    policy::bundles::names().collect::<Vec<_>>().join(", ")
                )
            })?;
            print!("{text}");
            Ok(0)
        }
        PolicyCommand::Bundles { name: None } => {
            for name in policy::bundles::names() {
                let bundle = policy::bundles::get(name)?;
                println!("{name:<22} {}", bundle.description.unwrap_or_default());
            }
            Ok(0)
        }
        PolicyCommand::Revoke { bundle, instance } => revoke(instance, bundle, true).await,
        PolicyCommand::Restore { bundle, instance } => revoke(instance, bundle, false).await,
        PolicyCommand::Reload { instance } => reload(instance).await,
        PolicyCommand::Allow { sandbox, host, ports, instance } => {
            add_host_rule(instance, sandbox, policy::Action::Allow, host, ports).await
        }
        PolicyCommand::Deny { sandbox, host, instance } => {
            add_host_rule(instance, sandbox, policy::Action::Deny, host, &[]).await
        }
        PolicyCommand::RemoveRule { sandbox, rule, instance } => {
            instance.daemon().await?.remove_rule(sandbox, rule).await?;
            println!("sandbox {sandbox}: removed rule {rule}");
            Ok(0)
        }
        PolicyCommand::Default => {
            print!("{}", policy::BUILTIN_DEFAULT_TOML);
            Ok(0)
        }
    }
}

async fn revoke(instance: &super::InstanceArgs, bundle: &str, revoke: bool) -> anyhow::Result<u8> {
    let answer = instance.daemon().await?.revoke_bundle(bundle, revoke).await?;
    let sandboxes: Vec<String> = answer["sandboxes"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let verb = if revoke { "revoked from" } else { "restored to" };
    if sandboxes.is_empty() {
        println!("bundle {bundle} {verb} every sandbox (none takes it now)");
    } else {
        println!("bundle {bundle} {verb} every sandbox; in force now for: {}", sandboxes.join(", "));
    }
    Ok(0)
}

async fn reload(instance: &super::InstanceArgs) -> anyhow::Result<u8> {
    let mut failed = false;
    for outcome in instance.daemon().await?.reload_profiles().await? {
        let sandbox = outcome["sandbox"].as_str().unwrap_or("?");
        match outcome.get("error").and_then(|e| e.as_str()) {
            Some(error) => {
                failed = true;
                println!("{sandbox}: refused, the last good profile stays: {error}");
            }
            None if outcome["changed"].as_bool() == Some(true) => println!("{sandbox}: new profile in force"),
            None => println!("{sandbox}: unchanged"),
        }
    }
    Ok(u8::from(failed))
}

async fn add_host_rule(
    instance: &super::InstanceArgs,
    sandbox: &str,
    action: policy::Action,
    host: &str,
    ports: &[u16],
) -> anyhow::Result<u8> {
    let rule = host_rule(action, host, ports)?;
    let status = instance.daemon().await?.add_rule(sandbox, &rule).await?;
    println!("sandbox {sandbox}: added rule {} ({})", rule.name.unwrap_or_default(), status.record.profile.describe());
    Ok(0)
}

/// A rule for one host: an IP or CIDR becomes an `ips` condition, anything
/// else a `hosts` pattern. Named after what it does, e.g. `allow-example.com`.
fn host_rule(action: policy::Action, host: &str, ports: &[u16]) -> anyhow::Result<policy::RuleSpec> {
    let is_address = host.parse::<std::net::IpAddr>().is_ok() || host.parse::<ipnet::IpNet>().is_ok();
    let name = format!("{action}-{}", host.replace('/', "-"));
    let condition = if is_address { format!("ips = [\"{host}\"]") } else { format!("hosts = [\"{host}\"]") };
    let ports = if ports.is_empty() {
        String::new()
    } else {
        format!("ports = [{}]\n", ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
    };
    let text = format!("name = \"cli\"\n[[rule]]\nname = \"{name}\"\naction = \"{action}\"\n{condition}\n{ports}");
    // Parsing validates the host the way a profile file would.
    let mut profile = policy::parse_profile(&text, "command line")?;
    Ok(profile.rules.remove(0))
}

/// One `[[case]]` of a policy test file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    name: Option<String>,
    #[serde(default = "get")]
    method: String,
    url: String,
    expect: String,
    /// The rule that must decide.
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    ip: Option<std::net::IpAddr>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body_size: Option<u64>,
    /// The sandbox's labels (a container's), for rules with `labels`.
    #[serde(default)]
    labels: policy::Labels,
}

fn get() -> String {
    "GET".into()
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    #[serde(rename = "case")]
    cases: Vec<Case>,
}

fn test_cases(file: &std::path::Path, cases_file: &std::path::Path) -> anyhow::Result<u8> {
    let profile = policy::load_profile_untrusted(file)?;
    let unlabelled = policy::Policy::compile(&profile)?;
    let text = std::fs::read_to_string(cases_file).with_context(|| format!("reading {}", cases_file.display()))?;
    let cases: Cases = toml::from_str(&text).map_err(|e| {
        let at = e.span().map(|s| {
            let before = &text[..s.start];
            format!(":{}:{}", before.matches('\n').count() + 1, s.start - before.rfind('\n').map_or(0, |i| i + 1) + 1)
        });
        anyhow::anyhow!("{}{}: {}", cases_file.display(), at.unwrap_or_default(), e.message())
    })?;
    let mut failed = 0;
    for (index, case) in cases.cases.iter().enumerate() {
        let label = case.name.clone().unwrap_or_else(|| format!("case {}", index + 1));
        let expect = policy::parse_verdict(&case.expect)
            .with_context(|| format!("{label}: expect must be allow, ask or deny, not {:?}", case.expect))?;
        let labelled;
        let compiled = if case.labels.is_empty() {
            &unlabelled
        } else {
            labelled = policy::Policy::compile_for(&profile, &policy::Revoked::new(), &case.labels)?;
            &labelled
        };
        let explained = policy::explain_url(compiled, &case.method, &case.url, case.ip, &case.headers, case.body_size)
            .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        let verdict_ok = explained.effective() == expect.as_str();
        let rule_ok = case.rule.as_ref().is_none_or(|rule| *rule == explained.rule);
        if verdict_ok && rule_ok {
            println!(
                "ok   {label}: {} {} -> {} ({})",
                explained.method,
                case.url,
                explained.effective(),
                explained.rule
            );
        } else {
            failed += 1;
            let wanted = match &case.rule {
                Some(rule) => format!("{} by {rule}", expect.as_str()),
                None => expect.as_str().to_owned(),
            };
            println!(
                "FAIL {label}: {} {} -> {} by {} ({}), expected {wanted}",
                explained.method,
                case.url,
                explained.effective(),
                explained.rule,
                explained.reason
            );
        }
    }
    println!(
        "{} cases, {} passed, {failed} failed ({})",
        cases.cases.len(),
        cases.cases.len() - failed,
        file.display()
    );
    Ok(u8::from(failed > 0))
}

fn replay(
    profile_path: &std::path::Path,
    since: Option<&str>,
    log: &std::path::Path,
    only: Option<&str>,
) -> anyhow::Result<u8> {
    use crate::audit::{Decision, Kind, Verdict};
    let profile = policy::load_profile_untrusted(profile_path)?;
    let compiled = policy::Policy::compile(&profile)?;
    let since = match since {
        None => None,
        Some(text) => Some(match humantime::parse_rfc3339_weak(text) {
            Ok(time) => time,
            Err(_) => {
                std::time::SystemTime::now()
                    - humantime::parse_duration(text)
                        .with_context(|| format!("--since {text:?} is neither an RFC 3339 time nor a duration"))?
            }
        }),
    };
    let file = std::fs::File::open(log).with_context(|| format!("reading the decision log {}", log.display()))?;
    let (mut replayed, mut changed, mut skipped) = (0usize, 0usize, 0usize);
    for line in std::io::BufRead::lines(std::io::BufReader::new(file)) {
        let line = line?;
        let Ok(record) = serde_json::from_str::<Decision>(&line) else {
            skipped += 1;
            continue;
        };
        if since.is_some_and(|since| humantime::parse_rfc3339_weak(&record.time).is_ok_and(|t| t < since))
            || only.is_some_and(|name| record.sandbox.as_deref() != Some(name))
        {
            continue;
        }
        let recorded = match (record.verdict, record.would_deny) {
            (Verdict::Allow, true) | (Verdict::Deny, _) => "deny",
            (Verdict::Allow, false) => "allow",
            _ => continue,
        };
        let (Some(destination), Some(host)) = (record.destination, record.host.as_deref()) else { continue };
        if crate::rules::decided_outside_policy(&record.rule) {
            skipped += 1;
            continue;
        }
        let now = match record.kind {
            Kind::Request => {
                let scheme = if record.protocol.as_deref() == Some("http") { "http" } else { "https" };
                let authority = if host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_ipv6()) {
                    format!("[{host}]:{}", destination.port())
                } else {
                    format!("{host}:{}", destination.port())
                };
                let url = format!("{scheme}://{authority}{}", record.path.as_deref().unwrap_or("/"));
                let method = record.method.as_deref().unwrap_or("GET");
                let no_headers = std::collections::BTreeMap::default();
                let Ok(explained) =
                    policy::explain_url(&compiled, method, &url, Some(destination.ip()), &no_headers, None)
                else {
                    skipped += 1;
                    continue;
                };
                (format!("{method} {url}"), explained.effective().to_owned(), explained.rule)
            }
            // Inspected connections are replayed through their requests.
            Kind::Connect if matches!(record.protocol.as_deref(), Some("tls" | "http")) => continue,
            Kind::Connect => {
                let name = (host.parse::<std::net::IpAddr>().is_err()).then_some(host);
                let query = policy::ConnectQuery { host: name, ip: destination.ip(), port: destination.port() };
                let decision = compiled.evaluate(&query);
                let verdict = if decision.would_deny { "deny" } else { decision.verdict.as_str() };
                (format!("connect {host}:{}", destination.port()), verdict.to_owned(), decision.rule.to_string())
            }
            _ => continue,
        };
        replayed += 1;
        let (what, verdict, rule) = now;
        if verdict != recorded {
            changed += 1;
            println!(
                "{} -> {}  {}  {what}  (was rule {}, now rule {rule})",
                recorded.to_ascii_uppercase(),
                verdict.to_ascii_uppercase(),
                record.sandbox.as_deref().unwrap_or("-"),
                record.rule
            );
        }
    }
    println!(
        "replayed {replayed} decisions from {} against {}: {changed} would change, {} the same; {skipped} skipped (decided outside policy or unreadable)",
        log.display(),
        profile_path.display(),
        replayed - changed
    );
    Ok(0)
}
