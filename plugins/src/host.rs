//! The plugin host: run a plugin executable as a [`Migrator`].
//!
//! [`PluginMigrator::spawn`] starts the executable with piped stdin, stdout
//! and stderr, says `hello`, checks the version, asks `describe`, and from
//! then on forwards every [`Migrator`] call as a request. It keeps the
//! plugin's failures on the plugin's side:
//!
//! - **a per-call timeout** ([`HostConfig::call_timeout`]); during `execute`
//!   and `rollback` each progress notification restarts it, so a long step
//!   that reports progress is not cut short, but a silent one is;
//! - **a maximum message size** ([`HostConfig::max_message_bytes`]): the
//!   host stops reading a longer line at the limit;
//! - **kill on drop or cancel**: dropping the migrator (or an in-flight
//!   call's future) kills the process; a cancelled step is sent `cancel`,
//!   then killed if it has not stopped after [`HostConfig::cancel_grace`];
//! - a crash, a hang, a malformed or oversized message kills the process and
//!   fails the call (and any other call in flight) with
//!   [`Error::Plugin`] naming the plugin and what it did. A crash or a hang
//!   is [`Retry::Transient`] (the next call starts a fresh process); a
//!   protocol violation is [`Retry::Never`].
//!
//! I/O runs on three plain threads per plugin (stdin writer, stdout reader,
//! stderr forwarder), not on the caller's runtime: the sync
//! [`Migrator::validate`] can then wait for its answer even on a
//! single-threaded runtime, and a plugin that stops reading its stdin
//! cannot block the caller.
//!
//! **Logs**: each stderr line is forwarded to `tracing` (target
//! `fluidcloud::plugin`, field `plugin`), with any secret value replaced by
//! `***`. **Secrets** ([`Secrets`]) are sent only to a plugin that declares
//! them in `describe`, only its declared ones, never with `validate`, and
//! are never logged by the host.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::diagnostic::Diagnostic;
use crate::error::{Error, Result, Retry};
use crate::migrator::{
    CancelFlag, Estimate, ExecContext, Migrator, MigratorDescriptor, ProgressSink, StepOutput,
    StepRequest,
};
use crate::protocol::{
    CancelCall, FEATURE_CANCEL, FEATURE_PROGRESS, FEATURE_SECRETS, Hello, MAX_MESSAGE_BYTES,
    PluginDescriptor, ReplyBody, Request, RollbackCall, StepCall, method,
};
use crate::serve::Plugin;
use crate::wire::{Frame, read_frame};

/// Environment variable naming a secret's value: `FLUIDCLOUD_SECRET_<NAME>`.
pub const SECRET_ENV_PREFIX: &str = "FLUIDCLOUD_SECRET_";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Named secret values the host may pass to plugins. `Debug` shows names
/// only.
#[derive(Clone, Default)]
pub struct Secrets(BTreeMap<String, String>);

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every `FLUIDCLOUD_SECRET_<NAME>` variable of the environment, as
    /// secret `<NAME>`.
    pub fn from_env() -> Self {
        Self(
            std::env::vars()
                .filter_map(|(k, v)| {
                    k.strip_prefix(SECRET_ENV_PREFIX)
                        .map(|n| (n.to_owned(), v.clone()))
                })
                .collect(),
        )
    }

    /// Adds or replaces a secret.
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.insert(name.into(), value.into());
        self
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Limits and inputs of the host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Longest wait for an answer (restarted by progress during `execute`
    /// and `rollback`).
    pub call_timeout: Duration,
    /// Longest wait for the `hello` and `describe` answers of a new process.
    pub handshake_timeout: Duration,
    /// After `cancel`, how long the plugin gets to stop before it is killed.
    pub cancel_grace: Duration,
    /// Largest line accepted from the plugin (and sent to it).
    pub max_message_bytes: usize,
    /// Secrets available to plugins that declare them.
    pub secrets: Secrets,
    /// Environment variables a plugin gets besides [`BASE_ENV`], by its
    /// executable's name (`fluidcloud-migrator-NAME`, or just `NAME`): a
    /// plugin process starts with an empty environment otherwise, so the
    /// host's tokens and cloud credentials never reach it.
    pub pass_env: BTreeMap<String, Vec<String>>,
}

/// The variables every plugin process gets from the host's environment.
pub const BASE_ENV: [&str; 3] = ["PATH", "HOME", "LANG"];

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(10),
            max_message_bytes: MAX_MESSAGE_BYTES,
            secrets: Secrets::new(),
            pass_env: BTreeMap::new(),
        }
    }
}

impl HostConfig {
    /// The environment of a plugin process started from `program`:
    /// [`BASE_ENV`] and what [`pass_env`](Self::pass_env) names for it, as
    /// far as the host has them.
    pub fn plugin_env(&self, program: &std::path::Path) -> Vec<(String, OsString)> {
        let file = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let short = file
            .strip_prefix(crate::discover::EXECUTABLE_PREFIX)
            .unwrap_or(&file)
            .to_owned();
        let extra = [file, short]
            .into_iter()
            .filter_map(|k| self.pass_env.get(&k).cloned())
            .flatten();
        BASE_ENV
            .into_iter()
            .map(str::to_owned)
            .chain(extra)
            .filter_map(|k| std::env::var_os(&k).map(|v| (k, v)))
            .collect()
    }
}

/// How to start a plugin: an executable and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginCommand {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments (none for a discovered plugin).
    pub args: Vec<OsString>,
}

impl PluginCommand {
    /// `program` without arguments.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    fn label(&self) -> String {
        self.program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.program.display().to_string())
    }
}

#[derive(Clone)]
enum Transport {
    Process(PluginCommand),
    InProcess(Plugin),
}

type Outcome = Result<serde_json::Value>;

enum Waiter {
    Async(oneshot::Sender<Outcome>),
    Sync(mpsc::SyncSender<Outcome>),
    Ignore,
}

impl Waiter {
    fn send(self, o: Outcome) {
        match self {
            Self::Async(tx) => {
                let _ = tx.send(o);
            }
            Self::Sync(tx) => {
                let _ = tx.try_send(o);
            }
            Self::Ignore => {}
        }
    }
}

struct Pending {
    method: &'static str,
    waiter: Waiter,
    progress: Option<Arc<dyn ProgressSink>>,
    activity: Option<Arc<Notify>>,
}

/// State shared by a connection and its I/O threads.
struct Shared {
    label: Mutex<String>,
    pending: Mutex<HashMap<u64, Pending>>,
    dead: Mutex<Option<(String, Retry)>>,
    child: Mutex<Option<Child>>,
    stderr_tail: Mutex<VecDeque<String>>,
    /// Set when the stderr reader reached end of file (or never started).
    stderr_closed: (Mutex<bool>, std::sync::Condvar),
    scrub: Vec<String>,
}

impl Shared {
    fn label(&self) -> String {
        lock(&self.label).clone()
    }

    fn error(&self, message: String, retry: Retry) -> Error {
        Error::Plugin {
            plugin: self.label(),
            message,
            retry,
            diagnostics: Vec::new(),
        }
    }

    fn dead_error(&self) -> Option<Error> {
        lock(&self.dead).clone().map(|(m, r)| self.error(m, r))
    }

    fn is_dead(&self) -> bool {
        lock(&self.dead).is_some()
    }

    fn kill(&self) {
        if let Some(c) = lock(&self.child).as_mut() {
            let _ = c.kill();
        }
    }

    /// Marks the connection dead (first reason wins), kills the process and
    /// fails every call in flight.
    fn poison(&self, message: String, retry: Retry) {
        {
            let mut d = lock(&self.dead);
            if d.is_none() {
                tracing::warn!(target: "fluidcloud::plugin", plugin = %self.label(), "{message}");
                *d = Some((message, retry));
            }
        }
        self.kill();
        let pending: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        if let Some((m, r)) = lock(&self.dead).clone() {
            for p in pending {
                let msg = format!("{m} (during `{}`)", p.method);
                p.waiter.send(Err(self.error(msg, r)));
            }
        }
    }

    fn route(&self, id: u64, body: ReplyBody) -> std::result::Result<(), String> {
        let mut pending = lock(&self.pending);
        if body.is_final() {
            let Some(p) = pending.remove(&id) else {
                return Err(format!("answered request {id}, which is not in flight"));
            };
            drop(pending);
            let outcome = match body {
                ReplyBody::Result(v) => Ok(v),
                ReplyBody::Error(e) => Err(e.into_error(&self.label())),
                ReplyBody::Progress(_) | ReplyBody::Message(_) => return Ok(()),
            };
            p.waiter.send(outcome);
            return Ok(());
        }
        let Some(p) = pending.get(&id) else {
            return Err(format!(
                "sent a notification for request {id}, which is not in flight"
            ));
        };
        let (sink, activity) = (p.progress.clone(), p.activity.clone());
        drop(pending);
        if let Some(a) = activity {
            a.notify_one();
        }
        if let Some(sink) = sink {
            match body {
                ReplyBody::Progress(pr) => sink.progress(pr.done, pr.total),
                ReplyBody::Message(m) => sink.message(&m),
                ReplyBody::Result(_) | ReplyBody::Error(_) => {}
            }
        }
        Ok(())
    }

    /// Waits (briefly) for the stderr reader to see end of file, so a dying
    /// plugin's last words are in the tail.
    fn wait_stderr_closed(&self, max: Duration) {
        let (m, cv) = &self.stderr_closed;
        let closed = lock(m);
        let _ = cv.wait_timeout_while(closed, max, |c| !*c);
    }

    fn tail(&self) -> String {
        let t = lock(&self.stderr_tail);
        if t.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = t.iter().map(String::as_str).collect();
            format!("; its last stderr lines: {}", lines.join(" | "))
        }
    }

    /// How the process ended, waiting briefly for it to finish exiting.
    fn exit_status(&self) -> String {
        let mut child = lock(&self.child);
        let Some(c) = child.as_mut() else {
            return "closed its output".into();
        };
        for _ in 0..50 {
            if let Ok(Some(status)) = c.try_wait() {
                return format!("exited ({status})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "closed its stdout".into()
    }

    fn scrub(&self, line: &str) -> String {
        let mut out = line.to_owned();
        for s in &self.scrub {
            if !s.is_empty() {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

fn stdout_loop(shared: Arc<Shared>, out: impl Read, max: usize) {
    let mut r = BufReader::with_capacity(64 * 1024, out);
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut r, max, &mut buf) {
            Ok(Frame::Line) => {
                let parsed = crate::protocol::decode_reply(&buf);
                let routed = parsed.and_then(|(id, body)| shared.route(id, body));
                if let Err(why) = routed {
                    let start: String = String::from_utf8_lossy(&buf[..buf.len().min(80)]).into();
                    shared.poison(
                        format!(
                            "sent a malformed message ({why}); the line began {start:?}; killed"
                        ),
                        Retry::Never,
                    );
                    return;
                }
            }
            Ok(Frame::TooLong) => {
                shared.poison(
                    format!("sent a message larger than the {max}-byte limit; killed"),
                    Retry::Never,
                );
                return;
            }
            Ok(Frame::Eof) | Err(_) => {
                if !shared.is_dead() {
                    let how = shared.exit_status();
                    shared.wait_stderr_closed(Duration::from_millis(500));
                    let msg = format!("{how}{}", shared.tail());
                    shared.poison(msg, Retry::Transient);
                }
                return;
            }
        }
    }
}

fn stderr_loop(shared: Arc<Shared>, err: impl Read) {
    const MAX_LOG_LINE: usize = 64 * 1024;
    let mut r = BufReader::new(err);
    let mut buf = Vec::new();
    while let Ok(frame) = read_frame(&mut r, MAX_LOG_LINE, &mut buf) {
        if frame == Frame::Eof {
            break;
        }
        let line = shared.scrub(&String::from_utf8_lossy(&buf));
        tracing::info!(target: "fluidcloud::plugin", plugin = %shared.label(), "{line}");
        let mut tail = lock(&shared.stderr_tail);
        if tail.len() == 5 {
            tail.pop_front();
        }
        tail.push_back(line.chars().take(300).collect());
    }
    let (m, cv) = &shared.stderr_closed;
    *lock(m) = true;
    cv.notify_all();
}

fn writer_loop(mut input: impl Write, rx: mpsc::Receiver<Vec<u8>>) {
    while let Ok(line) = rx.recv() {
        if input.write_all(&line).is_err() {
            return;
        }
        while let Ok(more) = rx.try_recv() {
            if input.write_all(&more).is_err() {
                return;
            }
        }
        if input.flush().is_err() {
            return;
        }
    }
}

/// A label, the child process, and the plugin's stdin, stdout and stderr.
type Pipes = (
    String,
    Option<Child>,
    Box<dyn Write + Send>,
    Box<dyn Read + Send>,
    Option<Box<dyn Read + Send>>,
);

/// One running plugin process (or in-process server) and its threads.
struct Connection {
    shared: Arc<Shared>,
    out: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    next_id: AtomicU64,
    config: HostConfig,
    hello: Hello,
    descriptor: PluginDescriptor,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Dead first, then stdin closed: the plugin exits when its stdin
        // closes, and the output reader, seeing it go, must already know
        // the host asked for it (else it warns that the plugin exited).
        lock(&self.shared.dead)
            .get_or_insert(("was shut down by the host".into(), Retry::Transient));
        lock(&self.out).take();
        self.shared.poison(String::new(), Retry::Transient);
        if let Some(mut c) = lock(&self.shared.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| Error::io(format!("cannot start the {name} thread"), e))
}

impl Connection {
    fn open(transport: &Transport, config: &HostConfig) -> Result<Self> {
        let (label, child, stdin, stdout, stderr): Pipes = match transport {
            Transport::Process(cmd) => {
                let label = cmd.label();
                let mut child = Command::new(&cmd.program)
                    .args(&cmd.args)
                    .env_clear()
                    .envs(config.plugin_env(&cmd.program))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| Error::Plugin {
                        plugin: label.clone(),
                        message: format!("cannot start {}: {e}", cmd.program.display()),
                        retry: Retry::Never,
                        diagnostics: Vec::new(),
                    })?;
                let missing = || Error::Precondition("plugin pipes missing".into());
                let stdin = child.stdin.take().ok_or_else(missing)?;
                let stdout = child.stdout.take().ok_or_else(missing)?;
                let stderr = child.stderr.take().ok_or_else(missing)?;
                (
                    label,
                    Some(child),
                    Box::new(stdin),
                    Box::new(stdout),
                    Some(Box::new(stderr)),
                )
            }
            Transport::InProcess(plugin) => {
                let label = plugin.descriptor().migrator.name;
                let (host_r, plugin_w) =
                    std::io::pipe().map_err(|e| Error::io("cannot create a pipe", e))?;
                let (plugin_r, host_w) =
                    std::io::pipe().map_err(|e| Error::io("cannot create a pipe", e))?;
                let p = plugin.clone();
                spawn_thread("plugin-harness", move || {
                    if let Err(e) = p.serve_io(plugin_r, plugin_w) {
                        eprintln!("in-process plugin stopped: {e}");
                    }
                })?;
                (label, None, Box::new(host_w), Box::new(host_r), None)
            }
        };
        let shared = Arc::new(Shared {
            label: Mutex::new(label),
            pending: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            child: Mutex::new(child),
            stderr_tail: Mutex::new(VecDeque::new()),
            stderr_closed: (Mutex::new(stderr.is_none()), std::sync::Condvar::new()),
            scrub: config.secrets.0.values().cloned().collect(),
        });
        let (tx, rx) = mpsc::channel();
        spawn_thread("plugin-stdin", move || writer_loop(stdin, rx))?;
        let s = shared.clone();
        let max = config.max_message_bytes;
        spawn_thread("plugin-stdout", move || stdout_loop(s, stdout, max))?;
        if let Some(err) = stderr {
            let s = shared.clone();
            spawn_thread("plugin-stderr", move || stderr_loop(s, err))?;
        }
        let mut conn = Self {
            shared,
            out: Mutex::new(Some(tx)),
            next_id: AtomicU64::new(1),
            config: config.clone(),
            hello: Hello::current(&[]),
            descriptor: PluginDescriptor {
                migrator: MigratorDescriptor {
                    name: String::new(),
                    version: String::new(),
                    summary: String::new(),
                    consumes: Vec::new(),
                    produces: Vec::new(),
                },
                secrets: Vec::new(),
            },
        };
        conn.handshake()?;
        Ok(conn)
    }

    fn handshake(&mut self) -> Result<()> {
        let ours = Hello::current(&[FEATURE_PROGRESS, FEATURE_CANCEL, FEATURE_SECRETS]);
        let t = self.config.handshake_timeout;
        let params = serde_json::to_value(&ours).map_err(|e| Error::Precondition(e.to_string()))?;
        let theirs: Hello = decode(
            &self.shared,
            method::HELLO,
            self.call_sync(method::HELLO, params, t)?,
        )?;
        if let Err(why) = ours.check_peer(&theirs) {
            let e = self
                .shared
                .error(format!("incompatible plugin: it {why}"), Retry::Never);
            self.shared.poison(e.to_string(), Retry::Never);
            return Err(e);
        }
        self.hello = theirs;
        let d: PluginDescriptor = decode(
            &self.shared,
            method::DESCRIBE,
            self.call_sync(method::DESCRIBE, serde_json::Value::Null, t)?,
        )?;
        *lock(&self.shared.label) = d.migrator.name.clone();
        self.descriptor = d;
        Ok(())
    }

    fn send(
        &self,
        method: &'static str,
        params: serde_json::Value,
        waiter: Waiter,
        progress: Option<Arc<dyn ProgressSink>>,
        activity: Option<Arc<Notify>>,
    ) -> Result<u64> {
        if let Some(e) = self.shared.dead_error() {
            return Err(e);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = Request {
            id,
            method: method.to_owned(),
            params,
        };
        let mut line = serde_json::to_vec(&req).map_err(|e| Error::Precondition(e.to_string()))?;
        if line.len() > self.config.max_message_bytes {
            return Err(self.shared.error(
                format!(
                    "the `{method}` request is {} bytes, over the {}-byte limit",
                    line.len(),
                    self.config.max_message_bytes
                ),
                Retry::Never,
            ));
        }
        line.push(b'\n');
        lock(&self.shared.pending).insert(
            id,
            Pending {
                method,
                waiter,
                progress,
                activity,
            },
        );
        let sent = lock(&self.out)
            .as_ref()
            .is_some_and(|tx| tx.send(line).is_ok());
        if !sent {
            self.shared
                .poison("stopped reading its stdin".into(), Retry::Transient);
        }
        Ok(id)
    }

    fn call_sync(
        &self,
        method: &'static str,
        params: serde_json::Value,
        timeout: Duration,
    ) -> Outcome {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(method, params, Waiter::Sync(tx), None, None)?;
        match rx.recv_timeout(timeout) {
            Ok(o) => o,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.shared.poison(
                    format!("did not answer `{method}` within {timeout:?}; killed"),
                    Retry::Transient,
                );
                Err(self.dead_or("timed out"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.dead_or("went away")),
        }
    }

    fn dead_or(&self, what: &str) -> Error {
        self.shared
            .dead_error()
            .unwrap_or_else(|| self.shared.error(what.into(), Retry::Transient))
    }

    async fn call(
        &self,
        method: &'static str,
        params: serde_json::Value,
        progress: Option<Arc<dyn ProgressSink>>,
        cancel: Option<&CancelFlag>,
    ) -> Outcome {
        let (tx, mut rx) = oneshot::channel();
        let activity = Arc::new(Notify::new());
        let id = self.send(
            method,
            params,
            Waiter::Async(tx),
            progress,
            Some(activity.clone()),
        )?;
        let mut guard = AbandonGuard(Some(&self.shared));
        let timeout = self.config.call_timeout;
        let mut deadline = Instant::now() + timeout;
        let mut cancel_deadline: Option<Instant> = None;
        loop {
            let mut wake = deadline;
            if let Some(c) = cancel_deadline {
                wake = wake.min(c);
            } else if cancel.is_some() {
                wake = wake.min(Instant::now() + Duration::from_millis(20));
            }
            tokio::select! {
                r = &mut rx => {
                    guard.0 = None;
                    return r.unwrap_or_else(|_| Err(self.dead_or("went away")));
                }
                () = activity.notified() => deadline = Instant::now() + timeout,
                () = tokio::time::sleep_until(wake) => {}
            }
            let now = Instant::now();
            match cancel_deadline {
                Some(c) if now >= c => self.shared.poison(
                    format!(
                        "did not stop within {:?} after `cancel`; killed",
                        self.config.cancel_grace
                    ),
                    Retry::Transient,
                ),
                Some(_) => {}
                None => {
                    if cancel.is_some_and(CancelFlag::is_cancelled) {
                        let p = serde_json::json!(CancelCall { target: id });
                        if self.hello.has(FEATURE_CANCEL) {
                            let _ = self.send(method::CANCEL, p, Waiter::Ignore, None, None);
                            cancel_deadline = Some(now + self.config.cancel_grace);
                        } else {
                            self.shared.poison(
                                "was cancelled and does not support `cancel`; killed".into(),
                                Retry::Transient,
                            );
                        }
                    }
                }
            }
            if now >= deadline {
                self.shared.poison(
                    format!("did not answer `{method}` within {timeout:?}; killed"),
                    Retry::Transient,
                );
            }
        }
    }
}

/// Kills the plugin when a call's future is dropped before its answer
/// came: the plugin's state is unknown, and it must not keep working.
struct AbandonGuard<'a>(Option<&'a Shared>);

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            s.poison(
                "was killed: the caller stopped waiting for an answer".into(),
                Retry::Transient,
            );
        }
    }
}

fn decode<T: DeserializeOwned>(shared: &Shared, method: &str, v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| {
        let msg = format!("answered `{method}` with a malformed result: {e}; killed");
        shared.poison(msg.clone(), Retry::Never);
        shared.error(msg, Retry::Never)
    })
}

/// The discovered plugins [`start_discovered`] started, and the ones it
/// could not use, each with the reason.
#[derive(Debug, Default)]
pub struct StartedPlugins {
    /// Started, handshaken and described, in discovery order.
    pub ok: Vec<(crate::discover::Discovered, PluginMigrator)>,
    /// Left out: failed to start or handshake, or named like a migrator
    /// already known.
    pub broken: Vec<(crate::discover::Discovered, String)>,
}

/// Starts every plugin in `found` (handshake and `describe`). A plugin
/// named like one of `taken` (the built-ins) or like an earlier plugin is
/// left out with a reason: built-ins win, then the first sighting. One
/// broken plugin never hides the others.
pub fn start_discovered(
    found: Vec<crate::discover::Discovered>,
    taken: &[&str],
    config: &HostConfig,
) -> StartedPlugins {
    let mut out = StartedPlugins::default();
    for f in found {
        match PluginMigrator::spawn(PluginCommand::new(&f.path), config.clone()) {
            Err(e) => out.broken.push((f, e.to_string())),
            Ok(m) => {
                let name = m.plugin_descriptor().migrator.name.clone();
                let clash = taken.contains(&name.as_str())
                    || out
                        .ok
                        .iter()
                        .any(|(_, o)| o.plugin_descriptor().migrator.name == name);
                if clash {
                    out.broken.push((
                        f,
                        format!(
                            "a migrator named `{name}` is already known; this plugin is ignored"
                        ),
                    ));
                } else {
                    out.ok.push((f, m));
                }
            }
        }
    }
    out
}

/// A plugin executable seen as a [`Migrator`]. See the module docs.
///
/// One process serves all calls (they may overlap); when it dies, the next
/// call starts a fresh one. Dropping the `PluginMigrator` kills it.
pub struct PluginMigrator {
    transport: Transport,
    config: HostConfig,
    descriptor: PluginDescriptor,
    hello: Hello,
    conn: Mutex<Option<Arc<Connection>>>,
}

impl fmt::Debug for PluginMigrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginMigrator")
            .field("name", &self.descriptor.migrator.name)
            .field("program", &self.command().map(|c| &c.program))
            .finish_non_exhaustive()
    }
}

impl PluginMigrator {
    /// Starts `command`, handshakes and asks `describe`.
    ///
    /// # Errors
    /// [`Error::Plugin`] when the executable cannot start, does not answer
    /// within [`HostConfig::handshake_timeout`], speaks an incompatible
    /// protocol version, or answers malformed messages.
    pub fn spawn(command: PluginCommand, config: HostConfig) -> Result<Self> {
        Self::start(Transport::Process(command), config)
    }

    /// Serves `plugin` on a thread of this process through real pipes: the
    /// full protocol without a process (what the [`harness`](crate::harness)
    /// uses).
    ///
    /// # Errors
    /// As [`PluginMigrator::spawn`].
    pub fn in_process(plugin: Plugin, config: HostConfig) -> Result<Self> {
        Self::start(Transport::InProcess(plugin), config)
    }

    fn start(transport: Transport, config: HostConfig) -> Result<Self> {
        let conn = Connection::open(&transport, &config)?;
        Ok(Self {
            transport,
            descriptor: conn.descriptor.clone(),
            hello: conn.hello.clone(),
            config,
            conn: Mutex::new(Some(Arc::new(conn))),
        })
    }

    /// What the plugin answered to `describe`.
    pub fn plugin_descriptor(&self) -> &PluginDescriptor {
        &self.descriptor
    }

    /// What the plugin answered to `hello` (its version and features).
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The executable, for a process plugin.
    pub fn command(&self) -> Option<&PluginCommand> {
        match &self.transport {
            Transport::Process(c) => Some(c),
            Transport::InProcess(_) => None,
        }
    }

    /// The process id of the running plugin process, if one is running.
    pub fn pid(&self) -> Option<u32> {
        let conn = lock(&self.conn).clone()?;
        if conn.shared.is_dead() {
            return None;
        }
        lock(&conn.shared.child).as_ref().map(Child::id)
    }

    /// Stops the plugin process now (the next call starts a new one).
    pub fn shutdown(&self) {
        lock(&self.conn).take();
    }

    fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = lock(&self.conn);
        if let Some(c) = slot.as_ref()
            && !c.shared.is_dead()
        {
            return Ok(c.clone());
        }
        slot.take();
        let c = Arc::new(Connection::open(&self.transport, &self.config)?);
        if c.descriptor.migrator.name != self.descriptor.migrator.name {
            return Err(c.shared.error(
                format!(
                    "restarted as `{}`, not `{}`",
                    c.descriptor.migrator.name, self.descriptor.migrator.name
                ),
                Retry::Never,
            ));
        }
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The declared secrets, from the host's [`Secrets`].
    fn secrets(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for name in &self.descriptor.secrets {
            let v = self.config.secrets.get(name).ok_or_else(|| {
                Error::Precondition(format!(
                    "plugin {} needs secret `{name}`: set {SECRET_ENV_PREFIX}{name}",
                    self.descriptor.migrator.name
                ))
            })?;
            out.insert(name.clone(), v.to_owned());
        }
        Ok(out)
    }

    fn step_call(&self, request: &StepRequest, with_secrets: bool) -> Result<serde_json::Value> {
        let secrets = if with_secrets {
            self.secrets()?
        } else {
            BTreeMap::new()
        };
        serde_json::to_value(StepCall {
            request: request.clone(),
            secrets,
        })
        .map_err(|e| Error::Precondition(format!("cannot encode the request: {e}")))
    }
}

#[async_trait]
impl Migrator for PluginMigrator {
    fn describe(&self) -> MigratorDescriptor {
        self.descriptor.migrator.clone()
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        let name = &self.descriptor.migrator.name;
        let fail = |e: Error| vec![Diagnostic::error(format!("{e}"))];
        let result = self.connection().and_then(|c| {
            let p = self.step_call(request, false)?;
            let v = c.call_sync(method::VALIDATE, p, self.config.call_timeout)?;
            decode::<Vec<Diagnostic>>(&c.shared, method::VALIDATE, v)
        });
        match result {
            Ok(d) => d,
            Err(e @ Error::Plugin { .. }) => fail(e),
            Err(e) => fail(Error::Plugin {
                plugin: name.clone(),
                message: e.to_string(),
                retry: Retry::Never,
                diagnostics: Vec::new(),
            }),
        }
    }

    async fn plan(&self, request: &StepRequest) -> Result<Estimate> {
        let c = self.connection()?;
        let p = self.step_call(request, true)?;
        let v = c.call(method::PLAN, p, None, None).await?;
        decode(&c.shared, method::PLAN, v)
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> Result<StepOutput> {
        let c = self.connection()?;
        let p = self.step_call(request, true)?;
        let v = c
            .call(
                method::EXECUTE,
                p,
                Some(ctx.progress.clone()),
                Some(&ctx.cancel),
            )
            .await?;
        decode(&c.shared, method::EXECUTE, v)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        output: Option<&StepOutput>,
        ctx: &ExecContext,
    ) -> Result<()> {
        let c = self.connection()?;
        let secrets = self.secrets()?;
        let p = serde_json::to_value(RollbackCall {
            request: request.clone(),
            output: output.cloned(),
            secrets,
        })
        .map_err(|e| Error::Precondition(format!("cannot encode the request: {e}")))?;
        c.call(
            method::ROLLBACK,
            p,
            Some(ctx.progress.clone()),
            Some(&ctx.cancel),
        )
        .await?;
        Ok(())
    }
}
