//! A libguestfs appliance, driven through guestfish's remote control.
//!
//! `guestfish --listen` starts a guestfish server holding one libguestfs
//! handle; each call is `guestfish --remote=PID -- -COMMAND ARGS`, a short
//! client process whose standard output is the command's. The leading `-`
//! keeps the server alive when a command fails (without it the server
//! exits on the first error); the server writes the error to its standard
//! error, which goes to a file of ours: a call fails when that file grew a
//! `libguestfs: error:` line. Calls are serialized.
//!
//! The guest's filesystems are parsed by the appliance's kernel, inside a
//! QEMU virtual machine, never by this process or the host's kernel: a
//! hostile filesystem attacks a throw-away VM. Paths inside the guest are
//! only ever names inside the appliance; host files are named by this
//! module alone (a private temporary directory for downloads and uploads).
//!
//! Disks are added with their declared format (a raw disk is never probed:
//! its bytes could claim to be qcow2 with a host file as backing).
//! Read-only disks get libguestfs's copy-on-write overlay, so the appliance
//! may replay a journal without writing the disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use fluidcloud_plugins::{Error, ImageFormat, Result};
use tokio::process::Command;
use tokio::sync::Mutex;

/// A disk given to the appliance.
#[derive(Debug, Clone)]
pub struct ApplianceDisk {
    /// The image file on this machine.
    pub path: PathBuf,
    /// Its declared format.
    pub format: ImageFormat,
}

/// How the appliance runs: `kvm` (hardware virtualization), `tcg` (QEMU's
/// emulation) or `auto`, kvm when it starts, else tcg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Try KVM, fall back to TCG (remembered for the process).
    #[default]
    Auto,
    /// KVM only.
    Kvm,
    /// TCG only.
    Tcg,
}

impl Accel {
    /// From a site's `accel` key.
    pub fn from_config(accel: Option<&str>) -> Self {
        match accel {
            Some("kvm") => Self::Kvm,
            Some("tcg") => Self::Tcg,
            _ => Self::Auto,
        }
    }
}

/// 0: unknown, 1: KVM launched, 2: KVM failed (use TCG).
static KVM_WORKS: AtomicU8 = AtomicU8::new(0);

/// A running appliance. Shut it down with [`Appliance::shutdown`]; dropped,
/// it is killed.
#[derive(Debug)]
pub struct Appliance {
    pid: u32,
    log: PathBuf,
    /// A private directory (0700) for files moved in and out.
    dir: tempfile::TempDir,
    /// Serializes calls; holds how much of the log was read.
    seen: Mutex<u64>,
    closed: bool,
    /// A file naming the server's PID while it waits between two steps
    /// (`crate::guest::keep`), removed when it stops.
    pid_file: Option<PathBuf>,
    /// How long the launch took.
    pub launch_time: Duration,
}

impl Appliance {
    /// Starts an appliance with `disks` and boots it; `readonly` opens
    /// them all through copy-on-write overlays.
    ///
    /// # Errors
    /// `NotSupported` when guestfish is missing; `Precondition` with
    /// libguestfs's message when the appliance does not start.
    pub async fn launch(disks: &[ApplianceDisk], readonly: bool, accel: Accel) -> Result<Self> {
        let tcg = match accel {
            Accel::Tcg => true,
            Accel::Kvm => false,
            Accel::Auto => KVM_WORKS.load(Ordering::Relaxed) == 2,
        };
        match Self::launch_with(disks, readonly, tcg).await {
            Ok(a) => {
                if !tcg {
                    KVM_WORKS.store(1, Ordering::Relaxed);
                }
                Ok(a)
            }
            Err(e) if accel == Accel::Auto && !tcg => {
                tracing::info!("libguestfs appliance did not start with KVM ({e}); using TCG");
                KVM_WORKS.store(2, Ordering::Relaxed);
                Self::launch_with(disks, readonly, true).await
            }
            Err(e) => Err(e),
        }
    }

    async fn launch_with(disks: &[ApplianceDisk], readonly: bool, tcg: bool) -> Result<Self> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("fluidcloud-guest-")
            .tempdir()
            .map_err(|e| Error::Precondition(format!("creating a temporary directory: {e}")))?;
        let log = dir.path().join("guestfish.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| Error::Precondition(format!("creating {}: {e}", log.display())))?;
        let mut cmd = Command::new("guestfish");
        cmd.arg("--listen");
        cmd.arg(if readonly { "--ro" } else { "--rw" });
        for d in disks {
            // --format applies to the drives after it.
            cmd.arg(format!("--format={}", qemu_format(d.format)?));
            cmd.arg("-a").arg(&d.path);
        }
        cmd.env(
            "LIBGUESTFS_BACKEND",
            std::env::var("LIBGUESTFS_BACKEND").unwrap_or_else(|_| "direct".into()),
        );
        if tcg && std::env::var_os("LIBGUESTFS_BACKEND_SETTINGS").is_none() {
            cmd.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
        }
        // Not `output()`: tokio's pipes both standard streams, and the
        // server keeps its standard error open for good.
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotSupported {
                    operation: "reading inside guest disks: guestfish (libguestfs-tools) is not installed; run scripts/setup".into(),
                    site: None,
                }
            } else {
                Error::Precondition(format!("starting guestfish: {e}"))
            }
        })?;
        let mut text = String::new();
        if let Some(stdout) = child.stdout.take() {
            use tokio::io::AsyncBufReadExt as _;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                text.push_str(&line);
                if line.contains("GUESTFISH_PID=") {
                    break;
                }
            }
        }
        let _ = child.wait().await;
        let pid = text
            .split(|c: char| c == ';' || c.is_whitespace())
            .find_map(|w| w.strip_prefix("GUESTFISH_PID="))
            .and_then(|p| p.parse::<u32>().ok())
            .ok_or_else(|| {
                Error::Precondition(format!(
                    "guestfish --listen did not start: {}",
                    read_tail(&log)
                ))
            })?;
        let mut a = Self {
            pid,
            log,
            dir,
            seen: Mutex::new(0),
            closed: false,
            pid_file: None,
            launch_time: Duration::ZERO,
        };
        // A launch is good when the appliance sees every disk: a server
        // whose appliance died answers with nothing, not an error.
        let started_ok = match a.call(&["run"]).await {
            Ok(_) => match a.lines(&["list-devices"]).await {
                Ok(d) if d.len() == disks.len() => Ok(()),
                Ok(d) => Err(format!(
                    "it sees {} of {} disks ({})",
                    d.len(),
                    disks.len(),
                    a.log_tail()
                )),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = started_ok {
            a.kill();
            return Err(Error::Precondition(format!(
                "the libguestfs appliance did not start{}: {e}",
                if tcg { " (TCG)" } else { "" }
            )));
        }
        a.launch_time = started.elapsed();
        Ok(a)
    }

    /// The last lines the guestfish server wrote (its errors), for a
    /// message.
    pub fn log_tail(&self) -> String {
        let t = read_tail(&self.log);
        if t.is_empty() {
            "guestfish wrote nothing".into()
        } else {
            t
        }
    }

    /// Names the server in `file` until it stops, so that a later process
    /// can stop it if this one dies first ([`stop_server`]).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn record_pid(&mut self, file: PathBuf) -> Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Precondition(format!("creating {}: {e}", dir.display())))?;
        }
        std::fs::write(&file, self.pid.to_string())
            .map_err(|e| Error::Precondition(format!("writing {}: {e}", file.display())))?;
        self.pid_file = Some(file);
        Ok(())
    }

    /// Runs one guestfish command; its standard output.
    ///
    /// # Errors
    /// `Precondition` with libguestfs's message.
    pub async fn call(&self, args: &[&str]) -> Result<String> {
        let mut seen = self.seen.lock().await;
        let (first, rest) = args
            .split_first()
            .ok_or_else(|| Error::Precondition("empty guestfish command".into()))?;
        let out = Command::new("guestfish")
            .arg(format!("--remote={}", self.pid))
            .arg("--")
            .arg(format!("-{first}"))
            .args(rest)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| Error::Precondition(format!("running guestfish: {e}")))?;
        let log = std::fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(*seen).unwrap_or(usize::MAX).min(log.len());
        let new = String::from_utf8_lossy(&log[start..]).into_owned();
        *seen = log.len() as u64;
        if !out.status.success() {
            return Err(Error::Precondition(format!(
                "guestfish {first}: {}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                new.trim()
            )));
        }
        if let Some(line) = new.lines().find(|l| l.contains("libguestfs: error:")) {
            let msg = line.split("libguestfs: error:").nth(1).unwrap_or(line);
            return Err(Error::Precondition(msg.trim().to_owned()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The lines of a command's output.
    ///
    /// # Errors
    /// As [`Self::call`].
    pub async fn lines(&self, args: &[&str]) -> Result<Vec<String>> {
        Ok(self
            .call(args)
            .await?
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// A path in the appliance's private host directory.
    pub fn host_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The tar archive of guest directory `dir` (mounted), read into memory.
    ///
    /// # Errors
    /// As [`Self::call`]; I/O errors reading it back.
    pub async fn tar_out(&self, dir: &str) -> Result<Vec<u8>> {
        let file = self.host_file("out.tar");
        let name = host_arg(&file)?;
        self.call(&["tar-out", dir, &name]).await?;
        let bytes = std::fs::read(&file)
            .map_err(|e| Error::Precondition(format!("reading {}: {e}", file.display())))?;
        let _ = std::fs::remove_file(&file);
        Ok(bytes)
    }

    /// Replaces the content of guest file `path` (keeping its inode, mode
    /// and owner when it exists).
    ///
    /// # Errors
    /// As [`Self::call`].
    pub async fn write(&self, path: &str, content: &[u8]) -> Result<()> {
        let file = self.host_file("in");
        std::fs::write(&file, content)
            .map_err(|e| Error::Precondition(format!("writing {}: {e}", file.display())))?;
        let name = host_arg(&file)?;
        let r = self.call(&["upload", &name, path]).await;
        let _ = std::fs::remove_file(&file);
        r.map(|_| ())
    }

    /// Unmounts everything, syncs and stops the appliance.
    ///
    /// # Errors
    /// As [`Self::call`]: an unmount or sync that failed (the disk may not
    /// hold everything written).
    pub async fn shutdown(mut self) -> Result<()> {
        let r = async {
            self.call(&["umount-all"]).await?;
            self.call(&["sync"]).await?;
            self.call(&["shutdown"]).await
        }
        .await;
        let pid = self.pid;
        let _ = tokio::task::spawn_blocking(move || stop_server(pid)).await;
        self.closed = true;
        if let Some(f) = self.pid_file.take() {
            let _ = std::fs::remove_file(f);
        }
        r.map(|_| ())
    }

    fn kill(&mut self) {
        if !self.closed {
            stop_server(self.pid);
            self.closed = true;
        }
        if let Some(f) = self.pid_file.take() {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// QEMU's name of a format the appliance opens: raw and qcow2 only. A
/// VMDK descriptor or a VHD names no host files QEMU would follow here,
/// but they are left out until they are tested.
fn qemu_format(f: ImageFormat) -> Result<&'static str> {
    match f {
        ImageFormat::Raw => Ok("raw"),
        ImageFormat::Qcow2 => Ok("qcow2"),
        other => Err(Error::NotSupported {
            operation: format!("reading inside a {other} disk (raw and qcow2 only)"),
            site: None,
        }),
    }
}

/// Stops the guestfish server `pid` (and so its appliance): asks it to
/// exit, waits up to 10 s, then kills it. Harmless for a PID that is no
/// guestfish server: the remote call finds no socket of that PID, and
/// only a guestfish is killed.
pub fn stop_server(pid: u32) {
    let _ = std::process::Command::new("guestfish")
        .arg(format!("--remote={pid}"))
        .arg("--")
        .arg("exit")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until && is_guestfish(&proc_dir) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if is_guestfish(&proc_dir) {
        tracing::warn!("guestfish server {pid} did not exit when asked; killing it");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Whether `/proc/PID` is a running guestfish.
fn is_guestfish(proc_dir: &Path) -> bool {
    std::fs::read(proc_dir.join("cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .is_some_and(|a| a.ends_with(b"guestfish"))
    })
}

fn host_arg(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Precondition(format!("{} is not UTF-8", p.display())))
}

/// The last lines of a log, for an error message.
fn read_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("; ")
}
