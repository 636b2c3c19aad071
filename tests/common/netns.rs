//! Throw-away machines for multi-host tests: `scripts/netns` namespaces
//! (orchestrator, site A, site B) and `fluidcloud agent`s inside them.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The agents' bearer token in tests.
pub const TOKEN: &str = "agent-token-for-tests";

pub fn netns() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netns")
}

/// Three throw-away machines, deleted when dropped.
pub struct Net {
    name: String,
}

impl Net {
    pub fn up(name: &str, rate: &str) -> Self {
        let out = Command::new(netns())
            .args(["up", name, "--rate", rate])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/netns up failed (run scripts/setup): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            name: name.to_owned(),
        }
    }

    pub fn script(&self, args: &[&str]) -> String {
        let out = Command::new(netns()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/netns {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn addr(&self, site: &str) -> String {
        self.script(&["addr", &self.name, site])
    }

    /// Bytes received and sent by `site`'s interface.
    pub fn counters(&self, site: &str) -> u64 {
        let line = self.script(&["counters", &self.name, site]);
        line.split_whitespace()
            .map(|n| n.parse::<u64>().unwrap())
            .sum()
    }

    pub fn link(&self, site: &str, state: &str) {
        self.script(&["link", &self.name, site, state]);
    }

    /// `CMD` in `site`'s namespace, the directories `hide` hidden.
    pub fn command(&self, site: &str, hide: &[&Path], cmd: &[&str]) -> Command {
        let mut c = Command::new(netns());
        c.args(["exec", &self.name, site]);
        for h in hide {
            c.arg("--hide").arg(h);
        }
        c.arg("--").args(cmd);
        c.env("FLUIDCLOUD_AGENT_TOKEN", TOKEN)
            .env_remove("FLUIDCLOUD_CONFIG")
            .env_remove("RUST_LOG");
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new(netns()).args(["down", &self.name]).output();
    }
}

/// Starts `fluidcloud --config CONFIG agent --site SITE` in namespace `ns`
/// of `net` on port `port`, the directories `hide` hidden from it; waits
/// for its fingerprint.
pub fn spawn_agent(
    net: &Net,
    ns: &str,
    config: &Path,
    site: &str,
    port: u16,
    hide: &[&Path],
) -> (Child, String) {
    spawn_agent_with(net, ns, config, site, port, hide, &[])
}

/// [`spawn_agent`] with `extra` arguments for the agent.
pub fn spawn_agent_with(
    net: &Net,
    ns: &str,
    config: &Path,
    site: &str,
    port: u16,
    hide: &[&Path],
    extra: &[&str],
) -> (Child, String) {
    let listen = format!("{}:{port}", net.addr(ns));
    let mut args = vec![
        env!("CARGO_BIN_EXE_fluidcloud"),
        "--config",
        config.to_str().unwrap(),
        "agent",
        "--site",
        site,
        "--listen",
        &listen,
    ];
    args.extend_from_slice(extra);
    let mut child = net
        .command(ns, hide, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let fp = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("agent {site} ended before printing its fingerprint"))
            .unwrap();
        if let Some(fp) = line.strip_prefix("fingerprint ") {
            break fp.to_owned();
        }
    };
    (child, fp)
}

/// The agent keys of an orchestrator's site entry.
pub fn agent_keys(net: &Net, ns: &str, port: u16, fingerprint: &str, token_var: &str) -> String {
    format!(
        "agent = \"https://{}:{port}\"\nagent_fingerprint = \"{fingerprint}\"\nagent_token_env = \"{token_var}\"\n",
        net.addr(ns)
    )
}
