//! `bhatti create`: creates a sandbox and waits until its agent answers.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::model::Sandbox;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Sandbox name (must match [a-zA-Z0-9][a-zA-Z0-9._-]{0,62}) [default: auto-generated]
    #[arg(long, value_parser = parse_name)]
    pub name: Option<String>,
    /// Number of vCPUs (at most your per-sandbox limit; a fork has its source's)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "from")]
    pub cpus: u32,
    /// Memory in MB (at most your per-sandbox limit; a fork has its source's)
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "from")]
    pub memory: u32,
    /// Comma-separated KEY=VALUE pairs (may be given more than once)
    #[arg(long, value_name = "KEY=VALUE,...", value_parser = parse_env_pairs)]
    pub env: Vec<EnvPairs>,
    /// Init script (runs as attachable TTY session "init")
    #[arg(long, value_name = "SCRIPT")]
    pub init: Option<String>,
    /// Never pause or save the sandbox when idle (see `bhatti edit`)
    #[arg(long)]
    pub keep_hot: bool,
    /// Fork: start from this sandbox's current memory and disk (running or
    /// stopped; it keeps running). The copy has the source's vCPUs and memory.
    #[arg(long, value_name = "SANDBOX")]
    pub from: Option<String>,
    /// A label KEY=VALUE (repeatable; at most 16): find sandboxes with
    /// `bhatti list --label KEY=VALUE`
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Egress posture: `public` (any public address) or `deny` (only what
    /// --allow-host and --allow-cidr open) [default: the daemon's `egress_default`]
    #[arg(long, value_name = "public|deny")]
    pub egress: Option<crate::egress::Posture>,
    /// A host name (or `*.suffix`) the sandbox may resolve and reach (repeatable)
    #[arg(long = "allow-host", value_name = "HOST", value_parser = parse_allow_host)]
    pub allow_hosts: Vec<String>,
    /// An IPv4 network (or address) the sandbox may reach, private ones
    /// included (repeatable)
    #[arg(long = "allow-cidr", value_name = "CIDR", value_parser = parse_allow_cidr)]
    pub allow_cidrs: Vec<String>,
    /// Attach a volume (repeatable): NAME:/mount, read-write (one sandbox
    /// at a time), or NAME:/mount:ro, read-only (many); mounted before the
    /// init script runs
    #[arg(long = "volume", value_name = "NAME:/MOUNT[:ro]", value_parser = crate::service::parse_volume_arg)]
    pub volumes: Vec<crate::model::volumes::VolumeMountRequest>,
    /// Boot from a custom image (yours or the operator's; see `bhatti image list`)
    #[arg(long, value_name = "NAME", conflicts_with = "from")]
    pub image: Option<String>,
    /// Boot a kernel even when a pre-booted template of this shape is ready
    /// (by default a new sandbox is restored from one: much faster)
    #[arg(long, conflicts_with = "from")]
    pub cold_boot: bool,
}

fn parse_allow_host(s: &str) -> Result<String, String> {
    crate::egress::check_host_pattern(s)
}

fn parse_allow_cidr(s: &str) -> Result<String, String> {
    crate::egress::parse_cidr(s).map(|n| n.to_string())
}

/// `KEY=VALUE` of `--label`, checked with the server's rules.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    crate::store::labels::parse_pair(s).map_err(|e| e.to_string())
}

/// The pairs of one `--env` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPairs(pub Vec<(String, String)>);

/// `POST /sandboxes` as the CLI sends it.
#[derive(Debug, Serialize)]
struct CreateBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_mb: Option<u32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    init: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    keep_hot: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    egress: Option<crate::egress::Posture>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_hosts: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_cidrs: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<crate::model::volumes::VolumeMountRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cold_boot: bool,
}

pub async fn run(ctx: Ctx, args: CreateArgs) -> anyhow::Result<i32> {
    let env: BTreeMap<String, String> = args.env.into_iter().flat_map(|p| p.0).collect();
    let body = CreateBody {
        name: args.name.as_deref(),
        // A copy has its source's machine size.
        cpus: args.from.is_none().then_some(args.cpus),
        memory_mb: args.from.is_none().then_some(args.memory),
        env,
        init: args.init.as_deref(),
        keep_hot: args.keep_hot,
        labels: args.labels.into_iter().collect(),
        from: args.from.as_deref(),
        egress: args.egress,
        allow_hosts: (!args.allow_hosts.is_empty()).then_some(args.allow_hosts),
        allow_cidrs: (!args.allow_cidrs.is_empty()).then_some(args.allow_cidrs),
        volumes: args.volumes,
        image: args.image.as_deref(),
        cold_boot: args.cold_boot,
    };
    let spinner = spinner(args.name.as_deref());
    let result = async {
        let rb = ctx
            .client
            .request(reqwest::Method::POST, &["sandboxes"])
            .json(&body);
        let resp = ctx.client.send(rb, Target::None).await?;
        let existed = resp.headers().contains_key("x-bhatti-existed");
        let sb: Sandbox = ctx.client.decode(resp).await?;
        anyhow::Ok((sb, existed))
    }
    .await;
    if let Some(s) = &spinner {
        s.finish_and_clear();
    }
    let (sb, existed) = result?;
    if let (true, Some(from)) = (existed, args.from.as_deref()) {
        // A copy was asked for and none was made: the sandbox of that name
        // is not a copy of `from` as it is now. (The API stays idempotent:
        // 200 and `X-Bhatti-Existed`, for orchestrators that retry.)
        if ctx.json {
            output::print_json(&sb)?;
        }
        eprintln!(
            "error: sandbox {} already exists; nothing was created (it is {}; it was not forked from {from} now). Destroy it first or pick another name",
            sb.name, sb.status
        );
        return Ok(1);
    }
    if existed && !ctx.json {
        eprintln!(
            "sandbox {} already exists; nothing was created (it is {}, {} vCPU, {} MB)",
            sb.name, sb.status, sb.cpus, sb.memory_mb
        );
        if sb.cpus != args.cpus || sb.memory_mb != args.memory {
            eprintln!(
                "warning: it keeps its {} vCPU and {} MB, not the {} vCPU and {} MB asked for; destroy it first to change them",
                sb.cpus, sb.memory_mb, args.cpus, args.memory
            );
        }
        return Ok(0);
    }
    if ctx.json {
        output::print_json(&sb)?;
        return Ok(0);
    }
    output::println(&format!(
        "created sandbox {} (id {}, {} vCPU, {} MB, ip {})",
        sb.name,
        sb.id,
        sb.cpus,
        sb.memory_mb,
        if sb.ip.is_empty() { "-" } else { &sb.ip }
    ))?;
    if args.init.is_some() {
        eprintln!(
            "init script running as session \"init\"; watch it with `bhatti shell {} --session init`",
            sb.name
        );
    }
    Ok(0)
}

/// A spinner with the elapsed time on stderr, only when stderr is a terminal.
fn spinner(name: Option<&str>) -> Option<ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner} {msg} {elapsed}")
        .expect("the spinner template is a valid constant");
    pb.set_style(style);
    pb.set_message(match name {
        Some(n) => format!("booting sandbox {n}…"),
        None => "booting sandbox…".to_string(),
    });
    pb.enable_steady_tick(Duration::from_millis(100));
    Some(pb)
}

/// Checks a sandbox name like the server does, so a typo is a usage error.
fn parse_name(s: &str) -> Result<String, String> {
    let mut chars = s.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a valid sandbox name (must match [a-zA-Z0-9][a-zA-Z0-9._-]{{0,62}})"
        ))
    }
}

/// Parses `KEY=VALUE,KEY2=VALUE2`; a malformed pair is named in the error.
pub fn parse_env_pairs(s: &str) -> Result<EnvPairs, String> {
    let mut pairs = Vec::new();
    for pair in s.split(',') {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("malformed pair {pair:?}: expected KEY=VALUE"));
        };
        let key = key.trim();
        let mut kc = key.chars();
        let valid = kc
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && kc.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "malformed pair {pair:?}: {key:?} is not an environment variable name \
                 (letters, digits and _, not starting with a digit)"
            ));
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(EnvPairs(pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs() {
        assert_eq!(
            parse_env_pairs("API_KEY=sk-abc,NODE_ENV=prod")
                .expect("ok")
                .0,
            vec![
                ("API_KEY".to_string(), "sk-abc".to_string()),
                ("NODE_ENV".to_string(), "prod".to_string())
            ]
        );
        assert_eq!(
            parse_env_pairs("A=x=y,B=").expect("ok").0,
            vec![("A".into(), "x=y".into()), ("B".into(), String::new())]
        );
        let e = parse_env_pairs("A=1,BROKEN").expect_err("malformed");
        assert!(e.contains("\"BROKEN\""), "{e}");
        let e = parse_env_pairs("1A=x").expect_err("bad key");
        assert!(e.contains("\"1A=x\""), "{e}");
        assert!(parse_env_pairs("=x").is_err());
        assert!(parse_env_pairs("").is_err());
    }

    #[test]
    fn names() {
        assert!(parse_name("dev").is_ok());
        assert!(parse_name("a.b_c-1").is_ok());
        assert!(parse_name(&"a".repeat(63)).is_ok());
        assert!(parse_name(&"a".repeat(64)).is_err());
        assert!(parse_name("-dev").is_err());
        assert!(parse_name("").is_err());
        assert!(parse_name("dev space").is_err());
    }

    /// A fork has its source's machine size: `--cpus`/`--memory` with
    /// `--from` are refused, not silently dropped.
    #[test]
    fn fork_refuses_a_machine_size() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut args = vec!["bhatti", "create", "--name", "b", "--from", "a"];
            args.extend_from_slice(extra);
            crate::cli::Cli::try_parse_from(args)
        };
        assert!(parse(&[]).is_ok());
        for extra in [&["--memory", "1024"][..], &["--cpus", "2"]] {
            let Err(err) = parse(extra) else {
                panic!("{extra:?} with --from must be refused");
            };
            let err = err.to_string();
            assert!(err.contains("cannot be used with"), "{err}");
        }
        let plain = ["bhatti", "create", "--name", "b", "--memory", "1024"];
        assert!(crate::cli::Cli::try_parse_from(plain).is_ok());
    }
}
