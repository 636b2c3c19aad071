//! [`serve`]: turn a Rust [`Migrator`] into a plugin executable.
//!
//! ```no_run
//! # use fluidcloud_plugins::*;
//! # struct MyMigrator;
//! # #[async_trait::async_trait]
//! # impl Migrator for MyMigrator {
//! #     fn describe(&self) -> MigratorDescriptor { unimplemented!() }
//! #     fn validate(&self, _: &StepRequest) -> Vec<Diagnostic> { vec![] }
//! #     async fn plan(&self, _: &StepRequest) -> Result<Estimate> { Ok(Estimate::default()) }
//! #     async fn execute(&self, _: &StepRequest, _: &ExecContext) -> Result<StepOutput> { Ok(StepOutput::default()) }
//! #     async fn rollback(&self, _: &StepRequest, _: Option<&StepOutput>, _: &ExecContext) -> Result<()> { Ok(()) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     fluidcloud_plugins::serve(MyMigrator)
//! }
//! ```
//!
//! The loop reads requests on one thread, writes replies on another, and
//! runs the migrator on a single-threaded tokio runtime: `plan`, `execute`
//! and `rollback` run as tasks, so a `cancel` is seen while they await. A
//! migrator that panics fails its call, not the plugin. Anything a migrator
//! wants to log goes to **stderr**: stdout belongs to the protocol.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Read, Write};
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, mpsc};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::migrator::{CancelFlag, ExecContext, Migrator, ProgressSink};
use crate::protocol::{
    CancelCall, ErrorBody, ErrorKind, FEATURE_CANCEL, FEATURE_PROGRESS, FEATURE_SECRETS, Hello,
    MAX_MESSAGE_BYTES, PluginDescriptor, Reply, Request, RollbackCall, StepCall, method,
};
use crate::wire::{Frame, read_frame};

tokio::task_local! {
    static SECRETS: Arc<BTreeMap<String, String>>;
}

/// The value of secret `name` inside a running `plan`, `execute` or
/// `rollback` served by [`serve`] (or the [`harness`](crate::harness)).
/// `None` outside such a call, or when the plugin did not declare the
/// secret with [`Plugin::needs_secret`], or the host has no value for it.
pub fn secret(name: &str) -> Option<String> {
    SECRETS.try_with(|s| s.get(name).cloned()).ok().flatten()
}

/// A migrator ready to be served, with what it needs from the host.
#[derive(Clone)]
pub struct Plugin {
    migrator: Arc<dyn Migrator>,
    secrets: Vec<String>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("migrator", &self.migrator.describe().name)
            .field("secrets", &self.secrets)
            .finish()
    }
}

/// Serves `migrator` on stdin/stdout until the host closes stdin.
/// Call it from a plain `fn main` (it starts its own runtime).
pub fn serve(migrator: impl Migrator + 'static) -> ExitCode {
    Plugin::new(migrator).serve()
}

impl Plugin {
    /// Wraps a migrator.
    pub fn new(migrator: impl Migrator + 'static) -> Self {
        Self::from_arc(Arc::new(migrator))
    }

    /// Wraps a shared migrator.
    pub fn from_arc(migrator: Arc<dyn Migrator>) -> Self {
        Self {
            migrator,
            secrets: Vec::new(),
        }
    }

    /// Declares that the migrator needs secret `name` (read it with
    /// [`secret`]). The host passes declared secrets only.
    #[must_use]
    pub fn needs_secret(mut self, name: impl Into<String>) -> Self {
        self.secrets.push(name.into());
        self
    }

    /// What `describe` answers.
    pub fn descriptor(&self) -> PluginDescriptor {
        PluginDescriptor {
            migrator: self.migrator.describe(),
            secrets: self.secrets.clone(),
        }
    }

    /// Serves on stdin/stdout; the exit code is 0 when the host closed
    /// stdin, 1 after an I/O or protocol failure (explained on stderr).
    pub fn serve(self) -> ExitCode {
        let name = self.migrator.describe().name;
        match self.serve_io(io::stdin(), io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::from(1)
            }
        }
    }

    /// Serves requests read from `input`, writing replies to `output`, until
    /// `input` ends. Blocks; starts its own single-threaded runtime.
    ///
    /// # Errors
    /// When the runtime cannot start, or the host sent an oversized line or
    /// an incompatible `hello`.
    pub fn serve_io<R, W>(self, input: R, output: W) -> io::Result<()>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let (out_tx, out_rx) = mpsc::channel::<Outgoing>();
        let writer = std::thread::Builder::new()
            .name("plugin-writer".into())
            .spawn(move || write_loop(output, out_rx))?;
        let (in_tx, mut in_rx) = tokio::sync::mpsc::unbounded_channel::<Input>();
        std::thread::Builder::new()
            .name("plugin-reader".into())
            .spawn(move || read_loop(input, in_tx))?;
        let out = Out(out_tx);
        let result = runtime.block_on(async move {
            let mut d = Dispatcher {
                plugin: self,
                out,
                greeted: false,
                running: Arc::new(Mutex::new(HashMap::new())),
            };
            while let Some(input) = in_rx.recv().await {
                match input {
                    Input::Line(line) => d.handle(&line)?,
                    Input::TooLong => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("the host sent a line over {MAX_MESSAGE_BYTES} bytes"),
                        ));
                    }
                    Input::Failed(e) => return Err(e),
                }
            }
            Ok(())
        });
        drop(runtime);
        // All senders are gone now: the writer drains what is left and ends.
        let _ = writer.join();
        result
    }
}

enum Input {
    Line(Vec<u8>),
    TooLong,
    Failed(io::Error),
}

fn read_loop(input: impl Read, tx: tokio::sync::mpsc::UnboundedSender<Input>) {
    let mut r = BufReader::with_capacity(64 * 1024, input);
    let mut buf = Vec::new();
    loop {
        let msg = match read_frame(&mut r, MAX_MESSAGE_BYTES, &mut buf) {
            Ok(Frame::Line) => Input::Line(std::mem::take(&mut buf)),
            Ok(Frame::Eof) => return,
            Ok(Frame::TooLong) => Input::TooLong,
            Err(e) => Input::Failed(e),
        };
        let stop = !matches!(msg, Input::Line(_));
        if tx.send(msg).is_err() || stop {
            return;
        }
    }
}

/// What the writer thread is asked to do, in order.
enum Outgoing {
    Line(Vec<u8>),
    /// Answer once every earlier line is written and flushed.
    Barrier(mpsc::SyncSender<()>),
}

fn write_loop(mut output: impl Write, rx: mpsc::Receiver<Outgoing>) {
    while let Ok(first) = rx.recv() {
        let mut barriers = Vec::new();
        let mut next = Some(first);
        // Batch what is already queued, then flush once.
        while let Some(msg) = next {
            match msg {
                Outgoing::Line(line) => {
                    if output.write_all(&line).is_err() {
                        return;
                    }
                }
                Outgoing::Barrier(done) => barriers.push(done),
            }
            next = rx.try_recv().ok();
        }
        if output.flush().is_err() {
            return;
        }
        for b in barriers {
            let _ = b.send(());
        }
    }
}

#[derive(Clone)]
struct Out(mpsc::Sender<Outgoing>);

impl Out {
    fn send(&self, reply: &Reply) {
        let mut line = serde_json::to_vec(reply).unwrap_or_else(|e| {
            let err = Reply::err(
                reply.id,
                ErrorBody::new(ErrorKind::Internal, format!("cannot encode the reply: {e}")),
            );
            serde_json::to_vec(&err).unwrap_or_default()
        });
        line.push(b'\n');
        let _ = self.0.send(Outgoing::Line(line));
    }

    /// Blocks until everything sent so far is written and flushed (or the
    /// writer is gone).
    fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.0.send(Outgoing::Barrier(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    fn result<T: Serialize>(&self, id: u64, value: &T) {
        match serde_json::to_value(value) {
            Ok(v) => self.send(&Reply::ok(id, v)),
            Err(e) => self.send(&Reply::err(
                id,
                ErrorBody::new(
                    ErrorKind::Internal,
                    format!("cannot encode the result: {e}"),
                ),
            )),
        }
    }
}

struct Sink {
    id: u64,
    out: Out,
}

impl ProgressSink for Sink {
    fn progress(&self, done: u64, total: Option<u64>) {
        self.out.send(&Reply::progress(self.id, done, total));
    }

    fn message(&self, text: &str) {
        self.out.send(&Reply::message(self.id, text));
    }

    fn flush(&self) {
        self.out.flush();
    }
}

type Running = Arc<Mutex<HashMap<u64, CancelFlag>>>;

struct Dispatcher {
    plugin: Plugin,
    out: Out,
    greeted: bool,
    running: Running,
}

fn params<T: DeserializeOwned>(req: &Request) -> Result<T, ErrorBody> {
    serde_json::from_value(req.params.clone()).map_err(|e| {
        ErrorBody::new(
            ErrorKind::Protocol,
            format!("bad params for `{}`: {e}", req.method),
        )
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl Dispatcher {
    fn handle(&mut self, line: &[u8]) -> io::Result<()> {
        let req: Request = match crate::protocol::decode_request(line) {
            Ok(r) => r,
            Err((id, msg)) => {
                // Answered with the id if one was found, so the host's
                // call fails at once instead of timing out.
                eprintln!("{msg}");
                self.out
                    .send(&Reply::err(id, ErrorBody::new(ErrorKind::Protocol, msg)));
                return Ok(());
            }
        };
        let id = req.id;
        if !self.greeted && req.method != method::HELLO {
            self.out.send(&Reply::err(
                id,
                ErrorBody::new(ErrorKind::Protocol, "`hello` must be the first request"),
            ));
            return Ok(());
        }
        match req.method.as_str() {
            method::HELLO => {
                let ours = Hello::current(&[FEATURE_PROGRESS, FEATURE_CANCEL, FEATURE_SECRETS]);
                let theirs: Hello = match params(&req) {
                    Ok(h) => h,
                    Err(e) => {
                        self.out.send(&Reply::err(id, e));
                        return Ok(());
                    }
                };
                if let Err(why) = ours.check_peer(&theirs) {
                    self.out.send(&Reply::err(
                        id,
                        ErrorBody::new(ErrorKind::Incompatible, format!("the host {why}")),
                    ));
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the host {why}"),
                    ));
                }
                self.greeted = true;
                self.out.result(id, &ours);
            }
            method::DESCRIBE => self.out.result(id, &self.plugin.descriptor()),
            method::VALIDATE => match params::<StepCall>(&req) {
                Ok(call) => {
                    let m = &self.plugin.migrator;
                    match std::panic::catch_unwind(AssertUnwindSafe(|| m.validate(&call.request))) {
                        Ok(diags) => self.out.result(id, &diags),
                        Err(p) => self.out.send(&Reply::err(
                            id,
                            ErrorBody::new(
                                ErrorKind::Internal,
                                format!("validate panicked: {}", panic_message(p.as_ref())),
                            ),
                        )),
                    }
                }
                Err(e) => self.out.send(&Reply::err(id, e)),
            },
            method::PLAN => match params::<StepCall>(&req) {
                Ok(call) => {
                    let m = self.plugin.migrator.clone();
                    self.spawn(id, call.secrets, None, async move {
                        m.plan(&call.request).await.map(serde_json::to_value)
                    });
                }
                Err(e) => self.out.send(&Reply::err(id, e)),
            },
            method::EXECUTE => match params::<StepCall>(&req) {
                Ok(call) => {
                    let m = self.plugin.migrator.clone();
                    let ctx = self.context(id);
                    self.spawn(id, call.secrets, Some(ctx.cancel.clone()), async move {
                        m.execute(&call.request, &ctx)
                            .await
                            .map(serde_json::to_value)
                    });
                }
                Err(e) => self.out.send(&Reply::err(id, e)),
            },
            method::ROLLBACK => match params::<RollbackCall>(&req) {
                Ok(call) => {
                    let m = self.plugin.migrator.clone();
                    let ctx = self.context(id);
                    self.spawn(id, call.secrets, Some(ctx.cancel.clone()), async move {
                        m.rollback(&call.request, call.output.as_ref(), &ctx)
                            .await
                            .map(|()| Ok(serde_json::Value::Null))
                    });
                }
                Err(e) => self.out.send(&Reply::err(id, e)),
            },
            method::CANCEL => match params::<CancelCall>(&req) {
                Ok(c) => {
                    if let Some(flag) = self
                        .running
                        .lock()
                        .ok()
                        .and_then(|r| r.get(&c.target).cloned())
                    {
                        flag.cancel();
                    }
                    self.out.send(&Reply::ok(id, serde_json::Value::Null));
                }
                Err(e) => self.out.send(&Reply::err(id, e)),
            },
            other => self.out.send(&Reply::err(
                id,
                ErrorBody::new(ErrorKind::NotSupported, format!("unknown method `{other}`")),
            )),
        }
        Ok(())
    }

    fn context(&self, id: u64) -> ExecContext {
        ExecContext {
            progress: Arc::new(Sink {
                id,
                out: self.out.clone(),
            }),
            cancel: CancelFlag::new(),
        }
    }

    fn spawn<F>(
        &self,
        id: u64,
        secrets: BTreeMap<String, String>,
        cancel: Option<CancelFlag>,
        fut: F,
    ) where
        F: std::future::Future<
                Output = crate::error::Result<serde_json::Result<serde_json::Value>>,
            > + Send
            + 'static,
    {
        // Only declared secrets reach the migrator, whatever the host sent.
        let secrets: BTreeMap<String, String> = secrets
            .into_iter()
            .filter(|(k, _)| self.plugin.secrets.contains(k))
            .collect();
        if let Some(flag) = cancel
            && let Ok(mut r) = self.running.lock()
        {
            r.insert(id, flag);
        }
        let out = self.out.clone();
        let running = self.running.clone();
        let task = tokio::spawn(SECRETS.scope(Arc::new(secrets), fut));
        tokio::spawn(async move {
            let result = task.await;
            if let Ok(mut r) = running.lock() {
                r.remove(&id);
            }
            let reply = match result {
                Ok(Ok(Ok(v))) => Reply::ok(id, v),
                Ok(Ok(Err(e))) => Reply::err(
                    id,
                    ErrorBody::new(
                        ErrorKind::Internal,
                        format!("cannot encode the result: {e}"),
                    ),
                ),
                Ok(Err(e)) => Reply::err(id, ErrorBody::from_error(&e)),
                Err(e) => {
                    let why = match e.try_into_panic() {
                        Ok(p) => format!("the migrator panicked: {}", panic_message(p.as_ref())),
                        Err(e) => format!("the migrator task ended: {e}"),
                    };
                    Reply::err(id, ErrorBody::new(ErrorKind::Internal, why))
                }
            };
            out.send(&reply);
        });
    }
}

/// Makes an [`Error`] for a step the migrator stopped because it was
/// cancelled; retrying after a resume may continue it.
pub fn cancelled(what: impl std::fmt::Display) -> Error {
    Error::Transient(format!("cancelled: {what}"))
}
