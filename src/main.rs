//! The `fluidcloud` command line.
//!
//! Every command prints for people by default and JSON with `--json`.
//! Errors are one line naming what is wrong and where, followed by the
//! chain of causes, and map to documented exit codes (see [`exit_code`] and
//! `docs/cli.md`). `anyhow` lives only here, at the edge.

// First, so that its `outln!` and `out!` macros are seen by the others.
#[macro_use]
mod output;
mod commands;
mod remote;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Relocate a running cloud service between IaaS and edge sites.
#[derive(Debug, Parser)]
#[command(name = "fluidcloud", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Sites file (default: $FLUIDCLOUD_CONFIG, then ./fluidcloud.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Run against a `fluidcloud serve` at URL instead of the local sites
    /// file (sites list, migrators list, match, relocate, status, resume,
    /// rollback, report); the token comes from $FLUIDCLOUD_TOKEN.
    #[arg(long, global = true, value_name = "URL", env = "FLUIDCLOUD_SERVER")]
    server: Option<String>,
    /// With an https:// --server: trust its certificate when this CA
    /// certificate (PEM) issued it, instead of the system's roots.
    #[arg(long, global = true, value_name = "FILE")]
    server_ca: Option<PathBuf>,
    /// With an https:// --server: accept only the certificate with this
    /// SHA-256 fingerprint (as `serve` prints it), whatever its names and
    /// issuer; for the self-signed certificate `serve` generates.
    #[arg(
        long,
        global = true,
        value_name = "sha256:HEX",
        env = "FLUIDCLOUD_SERVER_FINGERPRINT"
    )]
    server_fingerprint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List and inspect the sites of the sites file.
    #[command(subcommand)]
    Sites(commands::sites::SitesCommand),
    /// Discover a service's topology on a live site.
    Introspect(commands::introspect::IntrospectArgs),
    /// Choose target sites for a service, with the reasons.
    Match(commands::matching::MatchArgs),
    /// Migrators: list the built-in ones and plugins, show one.
    #[command(subcommand)]
    Migrators(commands::migrators::MigratorsCommand),
    /// Run the broker REST service.
    Serve(commands::serve::ServeArgs),
    /// Disk images: info, convert, check, compare (formats detected by content).
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Relocate a service: introspect, match, plan, copy, verify, cut over.
    Relocate(commands::relocate::RelocateArgs),
    /// Show what `relocate` would do, changing nothing.
    Plan(commands::relocate::RelocateArgs),
    /// List relocations, or show one's steps.
    Status(commands::relocate::StatusArgs),
    /// Continue an interrupted or failed relocation.
    Resume(commands::relocate::IdArgs),
    /// Undo a relocation: clean the target, restart the source.
    Rollback(commands::relocate::RollbackArgs),
    /// The report of a relocation: times, bytes, checksums, diffs, downtime.
    Report(commands::relocate::ReportArgs),
    /// The demo: local sites, no cloud account. Without a subcommand,
    /// creates a fresh demo environment and relocates the shop service.
    Demo(commands::demo::DemoArgs),
    /// Serve one site of this machine to orchestrators and other agents.
    Agent(commands::agent::AgentArgs),
    /// Move one disk from one site to another: agent to agent, or read and
    /// written by this process (local and AWS sites).
    Transfer(commands::transfer::TransferArgs),
}

/// An error that ends the process with a given exit code.
#[derive(Debug)]
pub(crate) struct ExitWith(pub(crate) u8, pub(crate) String);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for ExitWith {}

/// Global options every command sees.
pub(crate) struct Globals {
    pub(crate) config: Option<PathBuf>,
    pub(crate) json: bool,
    /// `--server URL`: the service to ask instead of the local sites file.
    pub(crate) server: Option<String>,
    /// `--server-ca`, `--server-fingerprint`: how to trust it.
    pub(crate) trust: remote::Trust,
}

impl Globals {
    /// The remote service, when `--server` (or `$FLUIDCLOUD_SERVER`) names one.
    pub(crate) fn remote(&self) -> anyhow::Result<Option<remote::Remote>> {
        self.server
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(|url| remote::Remote::new(url, &self.trust))
            .transpose()
    }

    /// Refuses `--server` for commands that only run locally.
    fn local_only(&self, what: &str) -> anyhow::Result<()> {
        if self.server.as_deref().is_some_and(|s| !s.trim().is_empty()) {
            anyhow::bail!(ExitWith(
                2,
                format!(
                    "`{what}` runs only on the machine of the sites file; drop --server (or unset $FLUIDCLOUD_SERVER)"
                )
            ));
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    register_process_secrets();
    init_logging(cli.verbose);
    let globals = Globals {
        config: cli.config,
        json: cli.json,
        server: cli.server,
        trust: remote::Trust {
            ca: cli.server_ca,
            fingerprint: cli.server_fingerprint,
        },
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Sites(c) => commands::sites::run(&globals, c).await,
            Command::Introspect(a) => {
                globals.local_only("introspect")?;
                commands::introspect::run(&globals, a).await
            }
            Command::Match(a) => commands::matching::run(&globals, a).await,
            Command::Migrators(c) => commands::migrators::run(&globals, c).await,
            Command::Serve(a) => {
                globals.local_only("serve")?;
                commands::serve::run(&globals, a).await
            }
            Command::Image(c) => {
                globals.local_only("image")?;
                commands::image::run(&globals, c).await
            }
            Command::Relocate(a) => commands::relocate::relocate(&globals, a).await,
            Command::Plan(a) => {
                globals.local_only("plan")?;
                commands::relocate::plan(&globals, a).await
            }
            Command::Status(a) => commands::relocate::status(&globals, a).await,
            Command::Resume(a) => commands::relocate::resume(&globals, a).await,
            Command::Rollback(a) => commands::relocate::rollback(&globals, a).await,
            Command::Report(a) => commands::relocate::report_cmd(&globals, a).await,
            Command::Demo(c) => {
                globals.local_only("demo")?;
                commands::demo::run(&globals, c).await
            }
            Command::Agent(a) => {
                globals.local_only("agent")?;
                commands::agent::run(&globals, a).await
            }
            Command::Transfer(a) => {
                globals.local_only("transfer")?;
                commands::transfer::run(&globals, a).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout stopped early (`| head`): not a failure.
        Err(e) if e.chain().any(|c| c.is::<output::StdoutClosed>()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            report(&e, code, globals.json);
            ExitCode::from(code)
        }
    }
}

/// Values this process must never print, log or store: the service and
/// agent tokens, plugin secrets, and the AWS variables object stores read.
/// (Credentials a sites file names are registered when it is loaded.)
fn register_process_secrets() {
    fluidcloud_plugins::redact::register_env([
        "FLUIDCLOUD_TOKEN",
        "FLUIDCLOUD_AGENT_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ]);
    for (k, v) in std::env::vars() {
        if k.starts_with(fluidcloud_plugins::host::SECRET_ENV_PREFIX) {
            fluidcloud_plugins::redact::register(&v);
        }
    }
}

/// Standard error for log lines, each redacted as a whole before it is
/// written (a log event is buffered until the formatter drops the writer).
#[derive(Default)]
struct RedactedStderr(Vec<u8>);

impl std::io::Write for RedactedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactedStderr {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            fluidcloud_plugins::redact::text(&text).as_bytes(),
        );
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(RedactedStderr::default)
        .with_target(false)
        .try_init();
}

/// Exit codes, documented in `docs/cli.md`:
///
/// | code | meaning |
/// |------|---------|
/// | 0 | success |
/// | 1 | failure not covered below (I/O, a site error) |
/// | 2 | bad command line (from clap) |
/// | 3 | invalid sites file, manifest, or config file syntax |
/// | 4 | unknown site, service or resource |
/// | 5 | a config file references an internal endpoint that resolves to nothing |
/// | 6 | the site does not support the operation |
/// | 7 | a precondition does not hold (target exists, instance running, ...) |
/// | 8 | corrupt data (disk image, journal) |
/// | 9 | no placement satisfies the constraints (the message names a minimal conflicting set) |
/// | 10 | refused for safety: permission denied, an unsafe image reference, a server certificate not trusted or not the pinned one, a private key others may read |
fn exit_code(e: &anyhow::Error) -> u8 {
    use fluidcloud_conduit::Error as C;
    use fluidcloud_plugins::Error as S;
    let sdk = |s: &S| match s {
        S::NotFound { .. } => 4,
        S::NotSupported { .. } => 6,
        S::Precondition(_) => 7,
        S::Corrupt { .. } => 8,
        S::Invalid(_) => 3,
        S::PermissionDenied { .. } => 10,
        _ => 1,
    };
    for cause in e.chain() {
        if let Some(ExitWith(code, _)) = cause.downcast_ref::<ExitWith>() {
            return *code;
        }
        if let Some(c) = cause.downcast_ref::<C>() {
            return match c {
                C::NoConfig | C::Config { .. } | C::MissingCredential { .. } => 3,
                C::UnknownSite { .. } => 4,
                C::UnresolvedReference { .. } => 5,
                C::Site { source, .. } => sdk(source),
                _ => 1,
            };
        }
        if let Some(s) = cause.downcast_ref::<S>() {
            return sdk(s);
        }
        if let Some(t) = cause.downcast_ref::<fluidcloud_broker::tls::TlsError>() {
            use fluidcloud_broker::tls::TlsError as T;
            return match t {
                T::Name { .. } | T::Fingerprint { .. } => 2,
                T::Invalid { .. } => 3,
                T::Insecure { .. } => 10,
                T::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => 10,
                _ => 1,
            };
        }
        if let Some(b) = cause.downcast_ref::<fluidcloud_broker::Error>() {
            return match b {
                fluidcloud_broker::Error::Invalid(_) => 3,
                fluidcloud_broker::Error::Infeasible { .. } => 9,
                _ => 1,
            };
        }
    }
    1
}

fn report(e: &anyhow::Error, code: u8, json: bool) {
    let mut diagnostics = e
        .chain()
        .find_map(|c| c.downcast_ref::<fluidcloud_conduit::Error>())
        .map(fluidcloud_conduit::Error::diagnostics)
        .unwrap_or_default();
    for d in &mut diagnostics {
        d.summary = fluidcloud_plugins::redact::string(&d.summary);
        if let Some(detail) = &mut d.detail {
            *detail = fluidcloud_plugins::redact::string(detail);
        }
    }
    // An error may quote a config line or a URL: redacted like any output.
    let redact = |s: String| fluidcloud_plugins::redact::string(&s);
    let causes: Vec<String> = e.chain().skip(1).map(|c| redact(c.to_string())).collect();
    let message = redact(e.to_string());
    if json {
        let doc = serde_json::json!({
            "error": {
                "message": message,
                "exit_code": code,
                "causes": causes,
                "diagnostics": diagnostics,
            }
        });
        eprintln!("{doc}");
        return;
    }
    eprintln!("error: {message}");
    for c in &causes {
        // thiserror messages often repeat their source; skip exact repeats.
        if !message.ends_with(c.as_str()) {
            eprintln!("  caused by: {c}");
        }
    }
    for d in diagnostics.iter().skip(1) {
        eprintln!("error: {d}");
    }
}
