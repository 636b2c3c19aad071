//! `fluidcloud demo` and `fluidcloud demo init DIR`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use fluidcloud_conduit::demo;
use indicatif::{ProgressBar, ProgressStyle};

use super::print_json;
use crate::Globals;
use crate::output::bytes;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct DemoArgs {
    #[command(subcommand)]
    command: Option<DemoCommand>,
    /// Where the demo environment lives
    /// (default: $XDG_DATA_HOME/fluidcloud/demo, or ~/.local/share/fluidcloud/demo).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DemoCommand {
    /// Create the demo environment in DIR: a Paris site running the "shop"
    /// service and four empty target sites.
    Init {
        /// Directory to create it in (created if missing).
        dir: PathBuf,
        /// Replace an existing demo environment in DIR.
        #[arg(long)]
        force: bool,
    },
}

fn default_dir() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("fluidcloud").join("demo")
}

pub(crate) async fn run(g: &Globals, args: DemoArgs) -> Result<()> {
    match args.command {
        Some(DemoCommand::Init { dir, force }) => init(g, dir, force, true).await,
        None => {
            // The embedded default: a fresh demo environment, then the shop
            // relocated from Paris to wherever the broker places it.
            let dir = args.dir.unwrap_or_else(default_dir);
            let config = dir.join("fluidcloud.toml");
            let fresh = !config.exists();
            if !g.json {
                outln!(
                    "{} the demo environment in {}",
                    if fresh { "creating" } else { "resetting" },
                    dir.display()
                )?;
            }
            // In JSON mode the one document printed is the report.
            init(
                &Globals {
                    config: None,
                    json: g.json,
                    server: None,
                    trust: Default::default(),
                },
                dir.clone(),
                !fresh,
                false,
            )
            .await?;
            let inner = Globals {
                config: Some(config),
                json: g.json,
                server: None,
                trust: Default::default(),
            };
            super::relocate::relocate(
                &inner,
                super::relocate::RelocateArgs::demo(demo::SOURCE_SITE, demo::SERVICE),
            )
            .await
        }
    }
}

async fn init(g: &Globals, dir: PathBuf, force: bool, print: bool) -> Result<()> {
    let bar = if g.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let progress = |done: u64, total: u64, what: &str| {
        bar.set_length(total);
        bar.set_position(done);
        if bar.message() != what {
            bar.set_message(what.to_owned());
        }
    };
    let summary = demo::init(&dir, force, &progress).await;
    bar.finish_and_clear();
    let summary = summary?;
    if !print {
        return Ok(());
    }
    if g.json {
        return print_json(&summary);
    }
    outln!("demo environment ready in {}", dir.display())?;
    outln!("  sites: {}", summary.sites.join(", "))?;
    outln!("  source {} runs the shop service:", demo::SOURCE_SITE)?;
    for (name, size, data) in &summary.images {
        outln!(
            "    image  {name:<22} {} virtual, {} of data",
            bytes(*size),
            bytes(*data)
        )?;
    }
    for (name, size, data) in &summary.volumes {
        outln!(
            "    volume {name:<22} {} virtual, {} of data",
            bytes(*size),
            bytes(*data)
        )?;
    }
    outln!(
        "    bucket {:<22} {} objects, {}",
        demo::MEDIA_BUCKET,
        summary.media_objects,
        bytes(summary.media_bytes)
    )?;
    outln!("\nnext:")?;
    outln!(
        "  fluidcloud --config {} sites list",
        summary.config.display()
    )?;
    outln!(
        "  fluidcloud --config {} introspect {} --service {}",
        summary.config.display(),
        demo::SOURCE_SITE,
        demo::SERVICE
    )?;
    Ok(())
}
