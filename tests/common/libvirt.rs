//! A real libvirt daemon for tests: `scripts/libvirt`, virsh, dir pools.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn libvirt_up() {
    let out = Command::new(repo().join("scripts/libvirt"))
        .arg("start")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "these tests need libvirtd; `scripts/libvirt start` exited {:?}: {} (run scripts/setup)",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn virsh_maybe(args: &[&str]) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn state(domain: &str) -> String {
    virsh_maybe(&["domstate", domain])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "undefined".into())
}

/// A dir pool in a fresh directory; domains of its prefix and the pool go
/// on drop.
pub struct Pool {
    pub name: String,
    pub dir: PathBuf,
}

impl Pool {
    pub fn new(name: String) -> Self {
        let dir = PathBuf::from("/var/lib/libvirt/fluidcloud-tests").join(&name);
        let p = Self { name, dir };
        p.clean();
        std::fs::create_dir_all(&p.dir).unwrap();
        virsh(&[
            "pool-define-as",
            &p.name,
            "dir",
            "--target",
            p.dir.to_str().unwrap(),
        ]);
        virsh(&["pool-start", &p.name]);
        p
    }

    pub fn prefix(&self) -> String {
        format!("{}-", self.name)
    }

    pub fn clean(&self) {
        if let Some(list) = virsh_maybe(&["list", "--all", "--name"]) {
            for d in list.lines().filter(|d| d.starts_with(&self.prefix())) {
                let _ = virsh_maybe(&["destroy", d]);
                let _ = virsh_maybe(&["undefine", d]);
            }
        }
        let _ = virsh_maybe(&["pool-destroy", &self.name]);
        let _ = virsh_maybe(&["pool-undefine", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.clean();
    }
}

pub fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

pub fn console_log(domain: &str) -> PathBuf {
    PathBuf::from(format!("/var/log/libvirt/qemu/{domain}.console.log"))
}

/// Sites `lv-a` and `lv-b` of a sites file, each a libvirt pool served by
/// `fluidcloud agent` in its own network namespace (scripts/netns), which
/// sees only its own pool's directory; libvirtd is the machine's, reached
/// through its local socket. The orchestrator runs in a third namespace
/// that sees neither pool, with a sites file of its own.
pub struct AgentPair {
    agents: Vec<std::process::Child>,
    /// The orchestrator's sites file.
    pub config: PathBuf,
    hide: [PathBuf; 2],
    net: super::netns::Net,
}

const AGENT_TOKEN_VAR: &str = "LV_AGENT_TOKEN";

impl AgentPair {
    /// Agents for `lv-a` (pool `a`) and `lv-b` (pool `b`) of the sites file
    /// `config`, in namespaces `net_name`; files go in `dir`.
    pub fn start(net_name: &str, config: &Path, dir: &Path, a: &Pool, b: &Pool) -> Self {
        use super::netns::{Net, agent_keys, spawn_agent};
        let text = std::fs::read_to_string(config).unwrap();
        let net = Net::up(net_name, "1gbit");
        let mut agents = Vec::new();
        let mut orch = String::new();
        for (ns, site, other) in [("a", "lv-a", b), ("b", "lv-b", a)] {
            let block = site_block(&text, site);
            let file = dir.join(format!("agent-{ns}.toml"));
            std::fs::write(&file, &block).unwrap();
            let (child, fp) = spawn_agent(&net, ns, &file, site, 7400, &[other.dir.as_path()]);
            agents.push(child);
            // The orchestrator's entry: the agent keys instead of the
            // daemon's (those are the agent's business).
            let local = [
                "uri",
                "pool",
                "domain_prefix",
                "shutdown_timeout_s",
                "accel",
                "change_tracking",
            ];
            let entry: String = block
                .lines()
                .filter(|l| !local.iter().any(|k| l.starts_with(&format!("{k} = "))))
                .map(|l| format!("{l}\n"))
                .collect();
            orch.push_str(&entry);
            orch.push_str(&agent_keys(&net, ns, 7400, &fp, AGENT_TOKEN_VAR));
            orch.push('\n');
        }
        let orch_dir = dir.join("orch");
        std::fs::create_dir_all(&orch_dir).unwrap();
        let config = orch_dir.join("fluidcloud.toml");
        std::fs::write(&config, orch).unwrap();
        Self {
            agents,
            config,
            hide: [a.dir.clone(), b.dir.clone()],
            net,
        }
    }

    /// `fluidcloud --config ORCH ARGS` in the orchestrator's namespace.
    pub fn fc(&self, args: &[&str]) -> std::process::Output {
        let config = self.config.to_str().unwrap();
        let mut all = vec![env!("CARGO_BIN_EXE_fluidcloud"), "--config", config];
        all.extend_from_slice(args);
        let hide: Vec<&Path> = self.hide.iter().map(PathBuf::as_path).collect();
        self.net
            .command("orch", &hide, &all)
            .env(AGENT_TOKEN_VAR, super::netns::TOKEN)
            .current_dir(self.config.parent().unwrap())
            .output()
            .unwrap()
    }
}

impl Drop for AgentPair {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

/// The `[sites.NAME]` block of the sites file `text`.
pub fn site_block(text: &str, name: &str) -> String {
    let start = text.find(&format!("[sites.{name}]")).unwrap();
    let end = text[start + 1..]
        .find("\n[sites.")
        .map_or(text.len(), |i| start + 2 + i);
    text[start..end].to_owned()
}
