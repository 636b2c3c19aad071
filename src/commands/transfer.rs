//! `fluidcloud transfer`: move one disk from one site to another. Between
//! two sites served by agents the data goes agent to agent, and this
//! process only starts the pull and shows its progress; between two sites
//! this process reaches itself (local directories, an AWS region), it
//! reads at one and writes at the other. Running it again after the
//! source changed moves only the chunks that differ.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use fluidcloud_conduit::driver::{DiskStore, SiteDriver, require_disks};
use fluidcloud_conduit::drivers::{self, agent::AgentSite};
use fluidcloud_conduit::transfer::local::{self, LocalMove};
use fluidcloud_conduit::transfer::orchestrate::{Move, transfer};
use fluidcloud_conduit::transfer::{CHUNK, DiskRef, PullStatus, TicketGrant};
use fluidcloud_plugins::{CancelFlag, ImageFormat};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::sites_file;
use crate::output::bytes;
use crate::{ExitWith, Globals};

#[derive(Debug, Args)]
pub(crate) struct TransferArgs {
    /// The disk to read: SITE:volume/NAME or SITE:image/NAME.
    #[arg(long, value_name = "SITE:STORE/NAME")]
    from: String,
    /// The disk to write: SITE:volume/NAME or SITE:image/NAME.
    #[arg(long, value_name = "SITE:STORE/NAME")]
    to: String,
    /// The source disk's format, as its site keeps it (default raw).
    #[arg(long, value_name = "FORMAT", default_value = "raw")]
    source_format: ImageFormat,
    /// The format to keep the copy in (default: the source's).
    #[arg(long, value_name = "FORMAT")]
    format: Option<ImageFormat>,
    /// Parallel streams (connections) between the agents.
    #[arg(long, value_name = "N")]
    streams: Option<u32>,
    /// Bytes per second on the wire: `500K`, `100M`, `1G` (powers of
    /// 1000; `KiB`, `MiB`, `GiB` for 1024), or bits with `kbit`, `mbit`,
    /// `gbit`.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    bwlimit: Option<u64>,
}

/// Parses a rate: a number and an optional unit.
pub(crate) fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a rate (e.g. 100M, 20MiB, 1gbit)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        other => return Err(format!("unknown rate unit `{other}` in `{s}`")),
    };
    let rate = n * mult;
    if !(1024.0..1e15).contains(&rate) {
        return Err(format!("`{s}`: a rate from 1 KiB/s up"));
    }
    Ok(rate as u64)
}

/// `SITE:STORE/NAME`.
fn parse_disk(flag: &str, s: &str) -> Result<(String, DiskStore, String)> {
    let bad = || {
        anyhow::anyhow!(ExitWith(
            2,
            format!("--{flag} `{s}` is not SITE:volume/NAME or SITE:image/NAME")
        ))
    };
    let (site, rest) = s.split_once(':').ok_or_else(bad)?;
    let (store, name) = rest.split_once('/').ok_or_else(bad)?;
    let store = match store {
        "volume" => DiskStore::Volume,
        "image" => DiskStore::Image,
        _ => return Err(bad()),
    };
    if site.is_empty() || name.is_empty() {
        return Err(bad());
    }
    Ok((site.to_owned(), store, name.to_owned()))
}

#[derive(Serialize)]
struct Report<'a> {
    from: &'a str,
    to: &'a str,
    virtual_size: u64,
    source_data_bytes: u64,
    seconds: f64,
    #[serde(flatten)]
    status: &'a PullStatus,
}

pub(crate) async fn run(g: &Globals, a: TransferArgs) -> Result<()> {
    let file = sites_file(g)?;
    let (from_site, from_store, from_name) = parse_disk("from", &a.from)?;
    let (to_site, to_store, to_name) = parse_disk("to", &a.to)?;
    let agents = [&from_site, &to_site].map(|s| file.site(s).map(|c| c.agent.is_some()));
    let from = DiskRef {
        store: from_store,
        name: from_name,
        format: a.source_format,
    };
    let into = DiskRef {
        store: to_store,
        name: to_name.clone(),
        format: a.format.unwrap_or(a.source_format),
    };
    let owner = format!("fluidcloud-transfer/{to_name}");
    let started = Instant::now();
    let (status, virtual_size, source_data) = match agents {
        [Ok(true), Ok(true)] => {
            let m = Move {
                from,
                into,
                owner,
                streams: a.streams,
                bwlimit: a.bwlimit,
                limit_key: Some(format!("{from_site}->{to_site}")),
                only: None,
            };
            let source = AgentSite::new(&from_site, file.site(&from_site)?)?;
            let target = AgentSite::new(&to_site, file.site(&to_site)?)?;
            between_agents(g, &source, &target, &m).await?
        }
        [Ok(false), Ok(false)] => {
            if a.streams.is_some() || a.bwlimit.is_some() {
                bail!(ExitWith(
                    2,
                    "--streams and --bwlimit apply to transfers between agents; these sites are reached from this process".into()
                ));
            }
            let source = drivers::open(&from_site, file.site(&from_site)?)?;
            let target = drivers::open(&to_site, file.site(&to_site)?)?;
            in_process(g, source, target, from, into, owner).await?
        }
        [Err(e), _] | [_, Err(e)] => return Err(e.into()),
        _ => bail!(ExitWith(
            6,
            format!(
                "{from_site} and {to_site}: `transfer` moves disks between two sites served by `fluidcloud agent`, or two sites this process reaches itself, not one of each"
            )
        )),
    };
    let seconds = started.elapsed().as_secs_f64();
    let report = Report {
        from: &a.from,
        to: &a.to,
        virtual_size,
        source_data_bytes: source_data,
        seconds,
        status: &status,
    };
    if g.json {
        outln!("{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    outln!(
        "moved {} to {} in {seconds:.2} s: {} of data in {} chunks, {} on the wire ({} chunks equal, {} resent, {} reconnects)",
        a.from,
        a.to,
        bytes(status.data_bytes),
        status.data_chunks,
        bytes(status.wire_bytes),
        status.same_chunks,
        status.resent_chunks,
        status.reconnects
    )?;
    outln!(
        "verified: Merkle root {}",
        status.root.as_deref().unwrap_or("-")
    )?;
    Ok(())
}

/// Agent to agent: (status, virtual size, source data bytes).
async fn between_agents(
    g: &Globals,
    source: &AgentSite,
    target: &AgentSite,
    m: &Move,
) -> Result<(PullStatus, u64, u64)> {
    let bar = progress_bar(g.json);
    let show = |s: &PullStatus, grant: &TicketGrant| {
        bar.set_length(grant.virtual_size.max(1));
        bar.set_position((s.done * CHUNK).min(grant.virtual_size));
        bar.set_message(format!(
            "{} on the wire, {} data",
            bytes(s.wire_bytes),
            bytes(s.data_bytes)
        ));
    };
    let result = transfer(source.client(), target.client(), m, &show).await;
    bar.finish_and_clear();
    let (status, grant) = result?;
    Ok((status, grant.virtual_size, grant.data_bytes))
}

/// Read at one site, written at the other, by this process (threads of
/// its own, as a relocation's transfer step does).
async fn in_process(
    g: &Globals,
    source: Box<dyn SiteDriver>,
    target: Box<dyn SiteDriver>,
    from: DiskRef,
    into: DiskRef,
    owner: String,
) -> Result<(PullStatus, u64, u64)> {
    let bar = progress_bar(g.json);
    let shown = bar.clone();
    let cancel = CancelFlag::new();
    let moved = tokio::task::spawn_blocking(move || {
        let m = LocalMove {
            source: require_disks(source.as_ref())?,
            from: &from,
            target: require_disks(target.as_ref())?,
            into: &into,
            owner: &owner,
            workers: 4,
            since: None,
            cancel: &cancel,
            progress: &|done, of| {
                shown.set_length((of * CHUNK).max(1));
                shown.set_position(done * CHUNK);
            },
        };
        local::run(&m)
    })
    .await??;
    bar.finish_and_clear();
    let size = moved.status.record.as_ref().map_or(0, |r| r.virtual_size);
    Ok((moved.status, size, moved.read))
}

fn progress_bar(json: bool) -> ProgressBar {
    let bar = ProgressBar::new(1);
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_their_units() {
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("1gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("2MiB"), Ok(2 << 20));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5 parsecs").unwrap_err().contains("parsecs"));
    }
}
