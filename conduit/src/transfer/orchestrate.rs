//! The control half: the orchestrator asks for a ticket at the source
//! agent, starts the pull at the target agent, and follows it. Only these
//! small JSON messages pass through the orchestrator.

use std::time::Duration;

use fluidcloud_plugins::{Error, Result};

use super::{DiskRef, PeerRef, PullRequest, PullState, PullStatus, TicketGrant, TicketRequest};
use crate::agent::client::AgentClient;

/// How long a status request waits at the target agent for the pull to
/// end before it answers with the progress so far: the orchestrator hears
/// of the end at once, and of progress four times a second.
const POLL: Duration = Duration::from_millis(250);
/// Failed status requests in a row before the orchestrator gives up on a
/// target agent (the pull may go on; a resumed step hashes what it wrote).
const POLL_FAILURES: u32 = 20;

/// What to move, and how.
#[derive(Debug, Clone)]
pub struct Move {
    /// The disk at the source.
    pub from: DiskRef,
    /// The disk at the target.
    pub into: DiskRef,
    /// Creator tag of the written disk (`RELOCATION/STEP`).
    pub owner: String,
    /// Stripes.
    pub streams: Option<u32>,
    /// Bytes per second on the wire.
    pub bwlimit: Option<u64>,
    /// What shares the limit.
    pub limit_key: Option<String>,
    /// The only chunks that can have changed since the last verified
    /// transfer of this disk (a change set); see [`PullRequest::only`].
    pub only: Option<Vec<u64>>,
}

/// Whole transfers tried (each with a new ticket) before giving up.
const ATTEMPTS: u32 = 4;

/// Moves `m.from` from the site of `source` into `m.into` at the site of
/// `target`, agent to agent; `progress` sees each status as it comes.
///
/// A transfer that fails for a reason that may pass (an agent restarted,
/// and its tickets went with it; an agent that does not answer for a
/// while) is started again with a new ticket, up to [`ATTEMPTS`] times
/// with backoff: the target keeps what it wrote, so each new attempt sends
/// only what is missing.
///
/// # Errors
/// The agents' refusals, a failed pull's error, or a target agent that
/// stopped answering.
pub async fn transfer(
    source: &AgentClient,
    target: &AgentClient,
    m: &Move,
    progress: &(dyn Fn(&PullStatus, &TicketGrant) + Send + Sync),
) -> Result<(PullStatus, TicketGrant)> {
    retrying(|| once(source, target, m, progress)).await
}

/// Runs `attempt` until it succeeds, fails for good, or has failed
/// [`ATTEMPTS`] times in all, waiting 1, 2, 4 s between attempts.
async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut n = 1;
    loop {
        match attempt().await {
            Err(e) if n < ATTEMPTS && may_pass(&e) => {
                tracing::info!(attempt = n, error = %e, "transfer failed; starting it again");
                tokio::time::sleep(Duration::from_secs(1 << (n - 1))).await;
                n += 1;
            }
            other => return other,
        }
    }
}

/// Whether a failed transfer may succeed if started again.
fn may_pass(e: &Error) -> bool {
    match e {
        Error::Transient(_) => true,
        Error::PermissionDenied { what, .. } => what.contains("unknown transfer ticket"),
        _ => false,
    }
}

async fn once(
    source: &AgentClient,
    target: &AgentClient,
    m: &Move,
    progress: &(dyn Fn(&PullStatus, &TicketGrant) + Send + Sync),
) -> Result<(PullStatus, TicketGrant)> {
    let grant: TicketGrant = source
        .post(
            "/v1/tickets",
            &TicketRequest {
                disk: Some(m.from.clone()),
                bucket: None,
                peer: target.fingerprint().to_string(),
                ttl_s: None,
            },
        )
        .await?;
    let req = PullRequest {
        source: PeerRef {
            url: source.url().to_owned(),
            fingerprint: source.fingerprint().to_string(),
            ticket: grant.ticket.clone(),
        },
        from: m.from.clone(),
        into: m.into.clone(),
        virtual_size: grant.virtual_size,
        owner: m.owner.clone(),
        streams: m.streams,
        bwlimit: m.bwlimit,
        limit_key: m.limit_key.clone(),
        only: m.only.clone(),
    };
    let started: PullStatus = target.post("/v1/pulls", &req).await?;
    let what = m.from.to_string();
    follow(source, target, &started.id, &what, &|s| progress(s, &grant))
        .await
        .map(|s| (s, grant.clone()))
}

/// A bucket to move, and how.
#[derive(Debug, Clone)]
pub struct BucketMove {
    /// The bucket at the source.
    pub from: String,
    /// The bucket at the target.
    pub into: String,
    /// Creator tag (`RELOCATION/STEP`).
    pub owner: String,
    /// Objects fetched at once.
    pub streams: Option<u32>,
    /// Bytes per second on the wire.
    pub bwlimit: Option<u64>,
    /// What shares the limit.
    pub limit_key: Option<String>,
}

/// Moves bucket `m.from` of the site of `source` into `m.into` at the site
/// of `target`, agent to agent, retried as [`transfer`] is.
///
/// # Errors
/// As [`transfer`].
pub async fn transfer_bucket(
    source: &AgentClient,
    target: &AgentClient,
    m: &BucketMove,
    progress: &(dyn Fn(&PullStatus) + Send + Sync),
) -> Result<PullStatus> {
    retrying(|| bucket_once(source, target, m, progress)).await
}

async fn bucket_once(
    source: &AgentClient,
    target: &AgentClient,
    m: &BucketMove,
    progress: &(dyn Fn(&PullStatus) + Send + Sync),
) -> Result<PullStatus> {
    let grant: TicketGrant = source
        .post(
            "/v1/tickets",
            &TicketRequest {
                disk: None,
                bucket: Some(m.from.clone()),
                peer: target.fingerprint().to_string(),
                ttl_s: None,
            },
        )
        .await?;
    let req = super::objects::BucketPullRequest {
        source: PeerRef {
            url: source.url().to_owned(),
            fingerprint: source.fingerprint().to_string(),
            ticket: grant.ticket.clone(),
        },
        from: m.from.clone(),
        into: m.into.clone(),
        owner: m.owner.clone(),
        streams: m.streams,
        bwlimit: m.bwlimit,
        limit_key: m.limit_key.clone(),
    };
    let started: PullStatus = target.post("/v1/bucket-pulls", &req).await?;
    follow(
        source,
        target,
        &started.id,
        &format!("bucket {}", m.from),
        progress,
    )
    .await
}

/// Follows pull `id` at `target` to its end.
async fn follow(
    source: &AgentClient,
    target: &AgentClient,
    id: &str,
    what: &str,
    progress: &(dyn Fn(&PullStatus) + Send + Sync),
) -> Result<PullStatus> {
    let path = format!("/v1/pulls/{id}?wait_ms={}", POLL.as_millis());
    let mut failures = 0;
    loop {
        let status: PullStatus = match target.get(&path).await {
            Ok(s) => {
                failures = 0;
                s
            }
            Err(e @ Error::Transient(_)) => {
                failures += 1;
                if failures >= POLL_FAILURES {
                    return Err(e);
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        progress(&status);
        match status.state {
            Some(PullState::Succeeded) => return Ok(status),
            Some(PullState::Failed) => {
                let why = status.error.clone().unwrap_or_default();
                let problem = crate::agent::Problem {
                    kind: status.error_kind.clone().unwrap_or_default(),
                    detail: format!("moving {what} from site {}: {why}", source.site()),
                    what: None,
                };
                return Err(problem.into_error(target.site()));
            }
            _ => {}
        }
    }
}
