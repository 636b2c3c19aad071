//! Sites on different machines: `fluidcloud agent` in network namespaces
//! (scripts/netns: orchestrator, site A and site B on a bridge, the site
//! links shaped with tbf), each agent in a mount namespace that hides the
//! other sites' directories. Disks move agent to agent; the orchestrator's
//! own interface counters show what passed through it.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Net, TOKEN};
use common::{fails, ok, random_file, same_bytes, stderr, stdout};

/// A test world: `root/site-a`, `root/site-b` (each a local site and the
/// sites file of its agent) and `root/orch` (the orchestrator's).
struct World {
    net: Net,
    root: PathBuf,
    agents: Vec<(String, Child)>,
    fingerprints: Vec<(String, String)>,
    /// Per namespace (`a`, `b`): the site's name, and its entry in the
    /// orchestrator's sites file without the agent keys.
    sites: Vec<(String, String, String)>,
}

const PORT: u16 = 7400;

impl World {
    fn new(name: &str, rate: &str) -> Self {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("agents-{name}"));
        let _ = std::fs::remove_dir_all(&root);
        for s in ["a", "b"] {
            let dir = root.join(format!("site-{s}"));
            common::local_site(&dir.join("data"));
            std::fs::write(
                dir.join("sites.toml"),
                format!(
                    "[sites.{s}]\nkind = \"local\"\npath = \"data\"\njurisdiction = \"EU/FR\"\nimage_formats = [\"raw\", \"qcow2\"]\nlocation = {{ region = \"r-{s}\", latitude = 1.0, longitude = 2.0 }}\n"
                ),
            )
            .unwrap();
        }
        std::fs::create_dir_all(root.join("orch")).unwrap();
        let sites = ["a", "b"]
            .iter()
            .map(|s| {
                (
                    (*s).to_owned(),
                    (*s).to_owned(),
                    format!(
                        "[sites.{s}]\nkind = \"local\"\njurisdiction = \"EU/FR\"\nimage_formats = [\"raw\", \"qcow2\"]\nlocation = {{ region = \"r-{s}\", latitude = 1.0, longitude = 2.0 }}\n"
                    ),
                )
            })
            .collect();
        Self {
            net: Net::up(name, rate),
            root,
            agents: Vec::new(),
            fingerprints: Vec::new(),
            sites,
        }
    }

    /// The demo's `dc-paris` as site A and `edge-nantes` as site B, each
    /// with its own sites file; the orchestrator's entries keep every key
    /// but `path`.
    fn demo(name: &str, rate: &str) -> Self {
        let mut w = Self::new(name, rate);
        let demo = w.root.join("demo");
        ok(&common::run(&["demo", "init", demo.to_str().unwrap()]));
        let text = std::fs::read_to_string(demo.join("fluidcloud.toml")).unwrap();
        w.sites.clear();
        for (ns, site) in [("a", "dc-paris"), ("b", "edge-nantes")] {
            let start = text.find(&format!("[sites.{site}]")).unwrap();
            let end = text[start + 1..]
                .find("\n[sites.")
                .map_or(text.len(), |i| start + 1 + i);
            let block = &text[start..end];
            let data = w.data(ns);
            std::fs::remove_dir_all(&data).unwrap();
            std::fs::rename(demo.join("sites").join(site), &data).unwrap();
            let with_path = block.replace(&format!("path = \"sites/{site}\""), "path = \"data\"");
            std::fs::write(w.site_dir(ns).join("sites.toml"), with_path).unwrap();
            let without: String = block
                .lines()
                .filter(|l| !l.starts_with("path = "))
                .map(|l| format!("{l}\n"))
                .collect();
            w.sites.push((ns.to_owned(), site.to_owned(), without));
        }
        std::fs::remove_dir_all(&demo).unwrap();
        w
    }

    fn site_name(&self, ns: &str) -> String {
        self.sites
            .iter()
            .find(|(n, _, _)| n == ns)
            .map(|(_, s, _)| s.clone())
            .unwrap()
    }

    fn site_dir(&self, s: &str) -> PathBuf {
        self.root.join(format!("site-{s}"))
    }

    fn data(&self, s: &str) -> PathBuf {
        self.site_dir(s).join("data")
    }

    fn others(&self, s: &str) -> Vec<PathBuf> {
        ["a", "b", "orch"]
            .iter()
            .filter(|o| **o != s)
            .map(|o| {
                if *o == "orch" {
                    self.root.join("orch")
                } else {
                    self.site_dir(o)
                }
            })
            .collect()
    }

    /// Starts site `s`'s agent in its namespace; waits for its fingerprint.
    fn start_agent(&mut self, s: &str) {
        self.start_agent_with(s, &[]);
    }

    /// [`Self::start_agent`] with `extra` arguments.
    fn start_agent_with(&mut self, s: &str, extra: &[&str]) {
        let hide = self.others(s);
        let hide: Vec<&Path> = hide.iter().map(PathBuf::as_path).collect();
        let config = self.site_dir(s).join("sites.toml");
        let (child, fp) = common::netns::spawn_agent_with(
            &self.net,
            s,
            &config,
            &self.site_name(s),
            PORT,
            &hide,
            extra,
        );
        self.fingerprints.retain(|(n, _)| n != s);
        self.fingerprints.push((s.to_owned(), fp));
        self.agents.push((s.to_owned(), child));
        self.write_orch_config(TOKEN_VAR);
    }

    /// The PID of site `s`'s agent.
    fn agent_pid(&self, s: &str) -> u32 {
        self.agents.iter().find(|(n, _)| n == s).unwrap().1.id()
    }

    /// Sends SIGTERM to site `s`'s agent and waits for it to exit: its
    /// exit status, and how long it took.
    fn terminate_agent(&mut self, s: &str) -> (std::process::ExitStatus, Duration) {
        let pid = self.agent_pid(s);
        let asked = Instant::now();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
        let at = self.agents.iter().position(|(n, _)| n == s).unwrap();
        let (_, mut agent) = self.agents.remove(at);
        let status = agent.wait().unwrap();
        (status, asked.elapsed())
    }

    fn kill_agent(&mut self, s: &str) {
        for (n, c) in &mut self.agents {
            if n == s {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.agents.retain(|(n, _)| n != s);
    }

    /// The orchestrator's sites file, its token from `token_var`.
    fn write_orch_config(&self, token_var: &str) {
        let mut text = String::new();
        for (s, fp) in &self.fingerprints {
            let (_, _, block) = self.sites.iter().find(|(n, _, _)| n == s).unwrap();
            text.push_str(block);
            text.push_str(&common::netns::agent_keys(
                &self.net, s, PORT, fp, token_var,
            ));
            text.push('\n');
        }
        std::fs::write(self.root.join("orch/sites.toml"), text).unwrap();
    }

    /// `fluidcloud --config orch/sites.toml ARGS` in the orchestrator's
    /// namespace, which sees neither site's directory.
    fn orch_command(&self, args: &[&str]) -> Command {
        let config = self.root.join("orch/sites.toml");
        let mut cmd = vec![
            env!("CARGO_BIN_EXE_fluidcloud"),
            "--config",
            config.to_str().unwrap(),
        ];
        cmd.extend_from_slice(args);
        let hide = [self.site_dir("a"), self.site_dir("b")];
        let hide: Vec<&Path> = hide.iter().map(PathBuf::as_path).collect();
        let mut c = self.net.command("orch", &hide, &cmd);
        c.env(TOKEN_VAR, TOKEN);
        c
    }

    /// Runs [`Self::orch_command`] to its end.
    fn orch(&self, args: &[&str]) -> Output {
        self.orch_command(args).output().unwrap()
    }

    /// Starts [`Self::orch_command`], its output piped.
    fn orch_spawn(&self, args: &[&str]) -> Child {
        self.orch_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const TOKEN_VAR: &str = "TEST_AGENT_TOKEN";

/// A disk of `size` MiB: random data and text in separate runs, holes
/// between them; returns its data bytes.
fn make_disk(path: &Path, size_mib: u64, random_mib: u64, text_mib: u64) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let tmp = path.with_extension("random");
    random_file(&tmp, random_mib << 20);
    let random = std::fs::read(&tmp).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size_mib << 20).unwrap();
    f.write_all_at(&random, 8 << 20).unwrap();
    let mut text = String::new();
    let mut i = 0u64;
    while (text.len() as u64) < text_mib << 20 {
        text.push_str(&format!(
            "2026-12-04T10:{:02}:{:02} shop-web[{}]: GET /cart/{} 200 in {} ms\n",
            (i / 60) % 60,
            i % 60,
            1000 + i % 7,
            i * 7919 % 100_000,
            i % 250
        ));
        i += 1;
    }
    text.truncate((text_mib << 20) as usize);
    let text_at = ((8 + random_mib + 16) << 20).min((size_mib - text_mib) << 20);
    f.write_all_at(text.as_bytes(), text_at).unwrap();
    (random_mib + text_mib) << 20
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\nstdout:\n{}\nstderr:\n{}",
            stdout(o),
            stderr(o)
        )
    })
}

#[test]
fn disks_move_agent_to_agent_and_never_through_the_orchestrator() {
    let mut w = World::new("fc-agent-move", "400mbit");
    let data = make_disk(&w.data("a").join("volumes/data.raw"), 256, 48, 48);
    // A qcow2 boot disk at A (made by qemu-img from a raw one), kept raw at B.
    let raw = w.data("a").join("boot.tmp");
    make_disk(&raw, 64, 8, 8);
    let out = Command::new(common::qemu_img())
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(w.data("a").join("images/boot.qcow2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.start_agent("a");
    w.start_agent("b");
    let before = w.net.counters("orch");
    let o = w.orch(&[
        "--json",
        "transfer",
        "--from",
        "a:volume/data.raw",
        "--to",
        "b:volume/data.raw",
    ]);
    let doc = json(&o);
    ok(&o);
    let o = w.orch(&[
        "--json",
        "transfer",
        "--from",
        "a:image/boot.qcow2",
        "--source-format",
        "qcow2",
        "--to",
        "b:image/boot.raw",
        "--format",
        "raw",
    ]);
    let image = json(&o);
    let through_orch = w.net.counters("orch") - before;
    same_bytes(
        &w.data("a").join("volumes/data.raw"),
        &w.data("b").join("volumes/data.raw"),
    );
    same_bytes(&raw, &w.data("b").join("images/boot.raw"));
    // The report's figures, against what the test wrote.
    assert_eq!(doc["data_bytes"], data, "{doc}");
    assert_eq!(doc["source_data_bytes"], data, "{doc}");
    assert!(
        doc["wire_bytes"].as_u64().unwrap() < data - (24 << 20),
        "the text half is compressed: {doc}"
    );
    assert_eq!(image["state"], "succeeded", "{image}");
    // Less than 1 % of the data crossed the orchestrator's interface.
    let moved = data + (16 << 20);
    assert!(
        through_orch * 100 < moved,
        "{through_orch} bytes through the orchestrator for {moved} bytes of data"
    );
    // Run again: nothing changed, nothing is sent but markers.
    let o = w.orch(&[
        "--json",
        "transfer",
        "--from",
        "a:volume/data.raw",
        "--to",
        "b:volume/data.raw",
    ]);
    let again = json(&o);
    assert_eq!(again["data_chunks"], 0, "{again}");
    assert!(again["wire_bytes"].as_u64().unwrap() < 64 << 10, "{again}");
}

/// `transfer` of a's `big.raw` to b, four stripes.
const BIG_TRANSFER: [&str; 8] = [
    "--json",
    "transfer",
    "--from",
    "a:volume/big.raw",
    "--to",
    "b:volume/big.raw",
    "--streams",
    "4",
];

/// A world at 200 Mbit/s whose site a holds `volumes/big.raw` with 160 MiB
/// of random data (about 7 s on the link), both agents started; its data
/// bytes.
fn big_disk_world(name: &str) -> (World, u64) {
    let mut w = World::new(name, "200mbit");
    let data = make_disk(&w.data("a").join("volumes/big.raw"), 256, 160, 0);
    w.start_agent("a");
    w.start_agent("b");
    (w, data)
}

/// Cuts a's link for 5 s once `part` holds `bytes` of data.
fn cut_link_after(w: &World, part: &Path, bytes: u64) {
    wait_for_bytes(part, bytes);
    w.net.link("a", "down");
    std::thread::sleep(Duration::from_secs(5));
    w.net.link("a", "up");
}

#[test]
fn a_cut_link_and_a_killed_agent_resume_without_sending_much_twice() {
    let (mut w, data) = big_disk_world("fc-agent-cut");
    let args = BIG_TRANSFER;
    let child = w.orch_spawn(&args);
    // Cut A's link for 5 s once the transfer is under way.
    let part = w.data("b").join("volumes/.big.raw.fcpart");
    cut_link_after(&w, &part, 16 << 20);
    let o = child.wait_with_output().unwrap();
    let doc = json(&o);
    ok(&o);
    same_bytes(
        &w.data("a").join("volumes/big.raw"),
        &w.data("b").join("volumes/big.raw"),
    );
    assert_eq!(
        doc["data_bytes"].as_u64().unwrap(),
        data + doc["resent_chunks"].as_u64().unwrap() * (4 << 20),
        "{doc}"
    );
    assert!(
        doc["resent_chunks"].as_u64().unwrap() <= 2 * 4,
        "at most a few chunks per stream sent twice: {doc}"
    );

    // SIGKILL the source agent mid-transfer: the transfer fails with one
    // clear line; after a restart, running it again sends what is missing.
    std::fs::remove_file(w.data("b").join("volumes/big.raw")).unwrap();
    let _ = std::fs::remove_file(w.data("b").join("volumes/.big.raw.fcowner"));
    let child = w.orch_spawn(&args);
    wait_for_bytes(&part, 48 << 20);
    w.kill_agent("a");
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "the transfer survived its source: {err}"
    );
    // The transfer started again with a new ticket while it could; the
    // agent stayed down, so the last word is the one that stopped it.
    assert!(
        err.contains("does not answer") || err.contains("source agent"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    w.start_agent("a");
    let o = w.orch(&args);
    let doc = json(&o);
    ok(&o);
    same_bytes(
        &w.data("a").join("volumes/big.raw"),
        &w.data("b").join("volumes/big.raw"),
    );
    let same = doc["same_chunks"].as_u64().unwrap();
    assert!(
        same >= 12,
        "the second run kept what the first wrote: {doc}"
    );
    assert!(
        doc["data_bytes"].as_u64().unwrap() <= data - (same - 4) * (4 << 20),
        "{doc}"
    );
}

/// Waits until the file `path` holds at least `n` bytes of data.
fn wait_for_bytes(path: &Path, n: u64) {
    use std::os::unix::fs::MetadataExt as _;
    let start = Instant::now();
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.blocks() * 512 >= n) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} never reached {n} bytes",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn wrong_token_wrong_fingerprint_and_a_down_agent_are_one_clear_line_each() {
    let mut w = World::new("fc-agent-bad", "1gbit");
    make_disk(&w.data("a").join("volumes/v.raw"), 32, 4, 4);
    w.start_agent("a");
    w.start_agent("b");
    let args = [
        "transfer",
        "--from",
        "a:volume/v.raw",
        "--to",
        "b:volume/v.raw",
    ];
    let target_dir = w.data("b").join("volumes");
    let untouched = || {
        let names: Vec<_> = std::fs::read_dir(&target_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "the target changed: {names:?}");
    };
    // A wrong token.
    let config = w.root.join("orch/sites.toml");
    let o = {
        let mut cmd = w.net.command(
            "orch",
            &[],
            &[
                env!("CARGO_BIN_EXE_fluidcloud"),
                "--config",
                config.to_str().unwrap(),
            ],
        );
        cmd.args(args)
            .env(TOKEN_VAR, "not-the-token")
            .output()
            .unwrap()
    };
    let err = fails(&o, 10);
    assert!(
        err.contains("refused the token in $TEST_AGENT_TOKEN"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    untouched();
    // A wrong fingerprint for B.
    let good = std::fs::read_to_string(&config).unwrap();
    let fp_b = w
        .fingerprints
        .iter()
        .find(|(n, _)| n == "b")
        .unwrap()
        .1
        .clone();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    std::fs::write(&config, good.replace(&fp_b, &wrong)).unwrap();
    let err = fails(&w.orch(&args), 10);
    assert!(err.contains(&fp_b) && err.contains(&wrong), "{err}");
    assert!(err.contains("not the pinned"), "{err}");
    untouched();
    std::fs::write(&config, &good).unwrap();
    // An agent that is down.
    w.kill_agent("b");
    let err = fails(&w.orch(&args), 1);
    assert!(err.contains("does not answer"), "{err}");
    assert!(
        err.contains(&format!("https://{}:{PORT}", w.net.addr("b"))),
        "{err}"
    );
    untouched();
    // No token at all at the orchestrator: a config error naming the key.
    let o = {
        let mut cmd = w.net.command(
            "orch",
            &[],
            &[
                env!("CARGO_BIN_EXE_fluidcloud"),
                "--config",
                config.to_str().unwrap(),
            ],
        );
        cmd.args(args).env_remove(TOKEN_VAR).output().unwrap()
    };
    let err = fails(&o, 3);
    assert!(
        err.contains("TEST_AGENT_TOKEN") && err.contains("agent_token_env"),
        "{err}"
    );
}

#[test]
fn a_ticket_serves_only_the_agent_it_was_granted_to() {
    let mut w = World::new("fc-agent-ticket", "1gbit");
    make_disk(&w.data("a").join("volumes/v.raw"), 16, 4, 0);
    w.start_agent("a");
    w.start_agent("b");
    let a = format!("https://{}:{PORT}", w.net.addr("a"));
    let fp_b = w
        .fingerprints
        .iter()
        .find(|(n, _)| n == "b")
        .unwrap()
        .1
        .clone();
    // The orchestrator asks A for a ticket for B...
    let curl = |args: &[&str]| -> String {
        let mut cmd = vec!["curl", "-sk", "--max-time", "10"];
        cmd.extend_from_slice(args);
        let o = w.net.command("orch", &[], &cmd).output().unwrap();
        stdout(&o)
    };
    let body =
        format!(r#"{{"disk":{{"store":"volume","name":"v.raw","format":"raw"}},"peer":"{fp_b}"}}"#);
    let grant: serde_json::Value = serde_json::from_str(&curl(&[
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        &format!("{a}/v1/tickets"),
    ]))
    .unwrap();
    let ticket = grant["ticket"].as_str().unwrap().to_owned();
    assert_eq!(grant["data_bytes"], 4 << 20);
    // ... and whoever holds the ticket without B's certificate is refused.
    let stripe = r#"{"stripe":0,"stripes":1,"from":0}"#;
    let refused = curl(&[
        "-H",
        &format!("Authorization: Ticket {ticket}"),
        "-H",
        "content-type: application/json",
        "-d",
        stripe,
        &format!("{a}/v1/transfers/stripe"),
    ]);
    assert!(refused.contains("presented none"), "{refused}");
    // A made-up ticket, and none at all.
    let unknown = curl(&[
        "-H",
        "Authorization: Ticket 00",
        "-H",
        "content-type: application/json",
        "-d",
        stripe,
        &format!("{a}/v1/transfers/stripe"),
    ]);
    assert!(unknown.contains("unknown transfer ticket"), "{unknown}");
    // The bearer token does not open transfers, nor a ticket the API.
    let with_token = curl(&[
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        "-H",
        "content-type: application/json",
        "-d",
        stripe,
        &format!("{a}/v1/transfers/stripe"),
    ]);
    assert!(
        with_token.contains("a transfer ticket is required"),
        "{with_token}"
    );
    let api = curl(&[
        "-H",
        &format!("Authorization: Ticket {ticket}"),
        &format!("{a}/v1/volumes"),
    ]);
    assert!(api.contains("bearer token is required"), "{api}");
    // Health needs nothing, and says which site and certificate.
    let health: serde_json::Value = serde_json::from_str(&curl(&[&format!("{a}/health")])).unwrap();
    assert_eq!(health["site"], "a");
    assert_eq!(
        health["fingerprint"],
        w.fingerprints
            .iter()
            .find(|(n, _)| n == "a")
            .unwrap()
            .1
            .as_str()
    );
}

/// Instance `web` of service `shop2` at site `s`: a qcow2 boot disk and a
/// raw volume. Returns the raw content of the boot disk (for comparing).
fn service_at(w: &World, s: &str, volume_mib: u64) -> PathBuf {
    let data = w.data(s);
    std::fs::write(
        data.join("instances/web.toml"),
        "name = \"web\"\nservice = \"shop2\"\nstate = \"running\"\nvcpus = 1\nmemory_mib = 256\nboot_image = \"web.qcow2\"\nvolumes = [\"data.raw\"]\n\n[format]\n\"web.qcow2\" = \"qcow2\"\n\"data.raw\" = \"raw\"\n",
    )
    .unwrap();
    let raw = w.root.join("web.raw");
    make_disk(&raw, 64, 8, 8);
    let out = Command::new(common::qemu_img())
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(data.join("images/web.qcow2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    make_disk(&data.join("volumes/data.raw"), 256, volume_mib, 0);
    raw
}

fn state_of(w: &World, s: &str) -> String {
    let text = std::fs::read_to_string(w.data(s).join("instances/web.toml")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("state = "))
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

fn check_moved(w: &World, raw: &Path) {
    same_bytes(
        &w.data("a").join("volumes/data.raw"),
        &w.data("b").join("volumes/data.raw"),
    );
    let out = Command::new(common::qemu_img())
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(w.data("b").join("images/web.qcow2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(state_of(w, "a"), "stopped");
    assert_eq!(state_of(w, "b"), "running");
}

#[test]
fn a_service_relocates_between_agents_and_resumes_after_its_source_agent_was_killed() {
    let mut w = World::new("fc-agent-reloc", "200mbit");
    let raw = service_at(&w, "a", 96);
    w.start_agent("a");
    w.start_agent("b");
    let before = w.net.counters("orch");
    let relocate = [
        "--json",
        "relocate",
        "--from",
        "a",
        "--service",
        "shop2",
        "--to",
        "b",
        "--yes",
    ];
    // The source agent dies in the middle of the volume's pre-copy and
    // stays down until the relocation gives up.
    let child = w.orch_spawn(&relocate);
    wait_for_bytes(&w.data("b").join("volumes/.data.raw.fcpart"), 24 << 20);
    w.kill_agent("a");
    let o = child.wait_with_output().unwrap();
    assert!(
        !o.status.success(),
        "the relocation survived its source agent"
    );
    let err = stderr(&o);
    assert!(
        err.contains("does not answer") || err.contains("source agent"),
        "{err}"
    );
    assert_eq!(state_of(&w, "a"), "running", "the source was never stopped");
    let doc: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap_or_default();
    let id = doc["id"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            std::fs::read_dir(w.root.join("orch/.fluidcloud/relocations"))
                .ok()?
                .find_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        })
        .unwrap();
    // Restarted, the agent serves again; `resume` completes the relocation
    // and the volume's pre-copy keeps what it had sent.
    w.start_agent("a");
    let o = w.orch(&["resume", &id]);
    ok(&o);
    check_moved(&w, &raw);
    let o = w.orch(&["--json", "report", &id]);
    let report = json(&o);
    let pre = common::report_step(&report, "precopy:data.raw");
    let written = pre["bytes_written"].as_u64().unwrap();
    assert!(
        written <= (96 - 24) << 20,
        "the resumed pre-copy kept what was written before the kill: {pre}"
    );
    let sync = common::report_step(&report, "sync:data.raw");
    assert_eq!(
        sync["bytes_written"], 0,
        "nothing changed after the pre-copy: {sync}"
    );
    // Everything went site to site: less than 1 % through the orchestrator.
    let moved = (96u64 + 16) << 20;
    let through_orch = w.net.counters("orch") - before;
    assert!(
        through_orch * 100 < moved,
        "{through_orch} bytes through the orchestrator for {moved} bytes of data"
    );
    // The rollback (forced: the service ran at b) removes all it made at
    // b, through b's agent, and starts the source again.
    let o = w.orch(&["rollback", "--force", &id]);
    ok(&o);
    for d in ["images", "volumes", "instances"] {
        let left: Vec<_> = std::fs::read_dir(w.data("b").join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{d} at b after the rollback: {left:?}");
    }
    // The leaves b's agent kept of the pulls went with the disks.
    let leaves = w.site_dir("b").join(".fluidcloud/agent-b/leaves");
    let kept: Vec<_> = std::fs::read_dir(&leaves)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    assert_eq!(state_of(&w, "a"), "running");
}

/// SHA-256 of every file under `dir` (relative path → digest), hidden
/// files (fluidcloud's records) left out.
fn digests(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let o = Command::new("sha256sum").arg(&p).output().unwrap();
                let sum = String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_owned();
                out.insert(p.strip_prefix(dir).unwrap().display().to_string(), sum);
            }
        }
    }
    out
}

#[test]
fn the_demo_shop_relocates_from_site_a_to_site_b_through_agents_only() {
    let mut w = World::demo("fc-agent-shop", "400mbit");
    let source_images = digests(&w.data("a").join("images"));
    let source_volumes = digests(&w.data("a").join("volumes"));
    let source_media = digests(&w.data("a").join("buckets/shop-media"));
    w.start_agent("a");
    w.start_agent("b");
    let before = w.net.counters("orch");
    let o = w.orch(&[
        "--json",
        "relocate",
        "--from",
        "dc-paris",
        "--service",
        "shop",
        "--to",
        "edge-nantes",
        "--yes",
    ]);
    ok(&o);
    let through_orch = w.net.counters("orch") - before;
    // Every disk, volume and object is at B, equal (re-hashed here), and
    // the configs name B's endpoints.
    let subset = |dir: &str, source: &std::collections::BTreeMap<String, String>, want: &[&str]| {
        let got = digests(&w.data("b").join(dir));
        let names: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(names, want, "{dir} at b");
        for (k, v) in &got {
            assert_eq!(source.get(k), Some(v), "{dir}/{k} differs from its source");
        }
    };
    subset(
        "images",
        &source_images,
        &["shop-app.qcow2", "shop-db.qcow2", "shop-web.qcow2"],
    );
    subset("volumes", &source_volumes, &["db-data.raw"]);
    assert_eq!(
        digests(&w.data("b").join("buckets/shop-media")),
        source_media
    );
    let app = std::fs::read_to_string(w.data("b").join("config/shop/app/app.yaml")).unwrap();
    assert!(
        app.contains("nantes.internal") && !app.contains("paris.internal"),
        "{app}"
    );
    let data: u64 = ["images", "volumes", "buckets/shop-media"]
        .iter()
        .map(|d| {
            let o = Command::new("du")
                .args(["-sb"])
                .arg(w.data("a").join(d))
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(
        through_orch * 100 < data,
        "{through_orch} bytes through the orchestrator for {data} bytes of data"
    );
    assert!(
        std::fs::read_to_string(w.data("a").join("instances/web.toml"))
            .unwrap()
            .contains("state = \"stopped\"")
    );
}

#[test]
fn bwlimit_holds_a_transfer_to_its_rate() {
    let mut w = World::new("fc-agent-bw", "1gbit");
    let data = make_disk(&w.data("a").join("volumes/v.raw"), 64, 16, 0);
    w.start_agent("a");
    w.start_agent("b");
    let start = Instant::now();
    let o = w.orch(&[
        "--json",
        "transfer",
        "--from",
        "a:volume/v.raw",
        "--to",
        "b:volume/v.raw",
        "--bwlimit",
        "4MiB",
    ]);
    let took = start.elapsed().as_secs_f64();
    let doc = json(&o);
    ok(&o);
    same_bytes(
        &w.data("a").join("volumes/v.raw"),
        &w.data("b").join("volumes/v.raw"),
    );
    // 16 MiB at 4 MiB/s after a quarter second's burst: at least 3.75 s,
    // on a link that carries it in a fraction of a second.
    let wire = doc["wire_bytes"].as_u64().unwrap();
    assert!(wire >= data, "{doc}");
    let floor = (wire as f64 - 1048576.0) / 4194304.0;
    assert!(
        took >= floor,
        "{took:.2} s for {wire} bytes at 4 MiB/s (at least {floor:.2} s)"
    );
}

/// A site of the orchestrator's own process, `here`, in `orch/here`.
fn add_site_here(w: &World) -> PathBuf {
    let here = w.root.join("orch/here");
    common::local_site(&here);
    let mut text = std::fs::read_to_string(w.root.join("orch/sites.toml")).unwrap();
    text.push_str(
        "[sites.here]\nkind = \"local\"\npath = \"here\"\njurisdiction = \"EU/FR\"\nimage_formats = [\"raw\", \"qcow2\"]\nlocation = { region = \"r-here\", latitude = 1.0, longitude = 2.0 }\n",
    );
    std::fs::write(w.root.join("orch/sites.toml"), text).unwrap();
    here
}

#[test]
fn a_service_moves_from_an_agent_into_this_process_and_on_to_another_agent() {
    let mut w = World::new("fc-agent-mix", "400mbit");
    let raw = service_at(&w, "a", 32);
    w.start_agent("a");
    w.start_agent("b");
    let here = add_site_here(&w);
    let relocate = |from: &str, to: &str| {
        let o = w.orch(&[
            "--json",
            "relocate",
            "--from",
            from,
            "--service",
            "shop2",
            "--to",
            to,
            "--yes",
        ]);
        ok(&o);
        json(&o)["id"].as_str().unwrap().to_owned()
    };
    let qcow2_holds = |disk: &Path| {
        let out = Command::new(common::qemu_img())
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&raw)
            .arg(disk)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    };
    // a (its agent) → here: this process pulls from a's agent.
    let first = relocate("a", "here");
    same_bytes(
        &w.data("a").join("volumes/data.raw"),
        &here.join("volumes/data.raw"),
    );
    qcow2_holds(&here.join("images/web.qcow2"));
    let report = json(&w.orch(&["--json", "report", &first]));
    let pre = common::report_step(&report, "precopy:data.raw");
    assert_eq!(pre["migrator"], "disk-transfer", "{pre}");
    assert!(pre["bytes_sent"].as_u64().unwrap() > 0, "{pre}");
    // here → b: b's agent pulls from this process, which serves the
    // disks for the length of each transfer only.
    let second = relocate("here", "b");
    same_bytes(
        &here.join("volumes/data.raw"),
        &w.data("b").join("volumes/data.raw"),
    );
    qcow2_holds(&w.data("b").join("images/web.qcow2"));
    assert_eq!(state_of(&w, "b"), "running");
    let stopped = std::fs::read_to_string(here.join("instances/web.toml")).unwrap();
    assert!(stopped.contains("state = \"stopped\""), "{stopped}");
    // Rolled back, b keeps nothing this relocation made.
    ok(&w.orch(&["rollback", "--force", &second]));
    for d in ["images", "volumes", "instances"] {
        let left: Vec<_> = std::fs::read_dir(w.data("b").join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{d} at b after the rollback: {left:?}");
    }
}

/// `VmHWM` and `VmRSS` of process `pid`, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| {
                v.trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    * 1024
            })
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn an_agent_stopped_with_sigterm_exits_at_a_chunk_and_the_transfer_resumes() {
    let (mut w, data) = big_disk_world("fc-agent-term");
    let args = BIG_TRANSFER;
    let child = w.orch_spawn(&args);
    let part = w.data("b").join("volumes/.big.raw.fcpart");
    wait_for_bytes(&part, 48 << 20);
    // SIGTERM to the pulling agent: it stops its pulls at their next
    // frame and exits on its own, promptly and successfully.
    let (status, took) = w.terminate_agent("b");
    assert!(status.success(), "the agent exited with {status}");
    assert!(took < Duration::from_secs(10), "it took {took:?} to stop");
    let o = child.wait_with_output().unwrap();
    assert!(
        !o.status.success(),
        "the transfer outlived its target agent"
    );
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    // What it wrote stayed; started again, the agent resumes from it.
    let kept = std::fs::metadata(&part).unwrap();
    let kept = std::os::unix::fs::MetadataExt::blocks(&kept) * 512;
    assert!(kept >= 48 << 20, "{kept}");
    w.start_agent("b");
    let o = w.orch(&args);
    let doc = json(&o);
    ok(&o);
    same_bytes(
        &w.data("a").join("volumes/big.raw"),
        &w.data("b").join("volumes/big.raw"),
    );
    let sent = doc["data_bytes"].as_u64().unwrap();
    assert!(
        sent <= data - kept + 4 * (4 << 20),
        "the resumed transfer sent {sent} bytes; {kept} of {data} were kept"
    );
}

/// Peak memory growth of the agent at `limited` (`--max-stripes 4`) while
/// four transfers of eight stripes each run from `a` to `b`, the other
/// agent unlimited.
fn growth_under_load(name: &str, limited: &str) -> u64 {
    let mut w = World::new(name, "400mbit");
    let disks = 4;
    for i in 0..disks {
        make_disk(&w.data("a").join(format!("volumes/d{i}.raw")), 96, 64, 0);
    }
    for s in ["a", "b"] {
        let max = if s == limited { "4" } else { "64" };
        w.start_agent_with(s, &["--max-stripes", max]);
    }
    let idle = memory_of(w.agent_pid(limited)).1;
    let children: Vec<Child> = (0..disks)
        .map(|i| {
            let (from, to) = (format!("a:volume/d{i}.raw"), format!("b:volume/d{i}.raw"));
            w.orch_spawn(&[
                "--json",
                "transfer",
                "--from",
                &from,
                "--to",
                &to,
                "--streams",
                "8",
            ])
        })
        .collect();
    for c in children {
        ok(&c.wait_with_output().unwrap());
    }
    for i in 0..disks {
        let name = format!("volumes/d{i}.raw");
        same_bytes(&w.data("a").join(&name), &w.data("b").join(&name));
    }
    let (peak, _) = memory_of(w.agent_pid(limited));
    eprintln!(
        "agent {limited}: idle {} MiB, peak {} MiB",
        idle >> 20,
        peak >> 20
    );
    peak.saturating_sub(idle)
}

#[test]
fn many_transfers_at_once_stay_within_the_agents_stripe_budget() {
    // 32 stripes are asked for, which made a sending agent without a limit
    // grow by about 380 MiB (measured). 4 at a time hold five to eight
    // 4 MiB chunks each (read, framed, two queued, some in the HTTP and
    // TLS layers; received, decoded): the sending agent grew by 93 to 127
    // MiB in six runs here, the receiving one by about 24 MiB. The bound
    // leaves room for that spread and still tells 4 stripes from 32.
    let bound = 4 * 10 * (4 << 20) + (32 << 20);
    for (name, limited) in [("fc-agent-mem-a", "a"), ("fc-agent-mem-b", "b")] {
        let grew = growth_under_load(name, limited);
        assert!(
            grew < bound,
            "agent {limited} grew by {} MiB for 4 stripes",
            grew >> 20
        );
    }
}

#[test]
fn a_relocation_rides_out_a_five_second_cut_of_the_site_link() {
    let mut w = World::new("fc-agent-rcut", "200mbit");
    // 128 MiB of random data in the volume: its pre-copy is the largest
    // transfer, about 5 s at 200 Mbit/s.
    let raw = service_at(&w, "a", 128);
    w.start_agent("a");
    w.start_agent("b");
    let child = w.orch_spawn(&[
        "--json",
        "relocate",
        "--from",
        "a",
        "--service",
        "shop2",
        "--to",
        "b",
        "--yes",
    ]);
    cut_link_after(&w, &w.data("b").join("volumes/.data.raw.fcpart"), 24 << 20);
    let o = child.wait_with_output().unwrap();
    ok(&o);
    let id = json(&o)["id"].as_str().unwrap().to_owned();
    check_moved(&w, &raw);
    // Chunks that were on the wire when the link went down came again: at
    // most two per stream (4 streams), over what the volume holds.
    let report = json(&w.orch(&["--json", "report", &id]));
    let pre = common::report_step(&report, "precopy:data.raw");
    assert_eq!(pre["attempts"], 1, "it rode the cut out by itself: {pre}");
    let written = pre["bytes_written"].as_u64().unwrap();
    let held = data_chunks(&w.data("a").join("volumes/data.raw")) * (4 << 20);
    assert!(
        written >= held && written <= held + 2 * 4 * (4 << 20),
        "{written} bytes written for {held} bytes of data chunks: {pre}"
    );
}

/// 4 MiB chunks of the file at `path` that are not all zeros.
fn data_chunks(path: &Path) -> u64 {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0;
    loop {
        let mut got = 0;
        while got < buf.len() {
            match f.read(&mut buf[got..]).unwrap() {
                0 => break,
                k => got += k,
            }
        }
        if got == 0 {
            return n;
        }
        if buf[..got].iter().any(|&b| b != 0) {
            n += 1;
        }
    }
}

#[test]
fn an_agent_without_a_token_answers_only_requests_naming_loopback() {
    use std::io::BufRead as _;
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agents-noauth");
    let _ = std::fs::remove_dir_all(&root);
    common::local_site(&root.join("data"));
    let config = root.join("sites.toml");
    std::fs::write(
        &config,
        "[sites.here]\nkind = \"local\"\npath = \"data\"\njurisdiction = \"EU/FR\"\nlocation = { region = \"r\", latitude = 1.0, longitude = 2.0 }\n",
    )
    .unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "agent",
            "--site",
            "here",
        ])
        .args(["--listen", "127.0.0.1:0", "--no-auth"])
        .env_remove("FLUIDCLOUD_AGENT_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    let url = lines
        .find_map(|l| {
            l.unwrap()
                .split_whitespace()
                .find(|w| w.starts_with("https://"))
                .map(str::to_owned)
        })
        .unwrap();
    let get = |host: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-sk", "-o", "/dev/stderr", "-w", "%{http_code}"]);
        if let Some(h) = host {
            c.args(["-H", &format!("Host: {h}")]);
        }
        let o = c.arg(format!("{url}/v1/site")).output().unwrap();
        (stdout(&o), stderr(&o))
    };
    let (code, body) = get(None);
    assert_eq!(code, "200", "{body}");
    // A name that is not loopback (a DNS-rebinding page would send its
    // own) is refused with one clear line.
    let (code, body) = get(Some("evil.example"));
    assert_eq!(code, "421", "{body}");
    assert!(
        body.contains("evil.example") && body.contains("without a token"),
        "{body}"
    );
    let (code, _) = get(Some("localhost"));
    assert_eq!(code, "200");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// The processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<String> {
    let o = Command::new("pgrep")
        .args(["-af", needle])
        .output()
        .unwrap();
    stdout(&o)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_guest_appliance_waits_in_the_agent_and_stops_with_it() {
    let mut w = World::new("fc-agent-guest", "1gbit");
    // A guest disk: MBR, one ext4 partition with a small root.
    let tree = w.root.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "solo\n").unwrap();
    let disk = w.data("a").join("images/solo-guest.raw");
    let out = Command::new(common::libvirt::repo().join("scripts/libvirt"))
        .arg("rootfs-disk")
        .arg(&tree)
        .arg(&disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    w.start_agent("a");
    let a = format!("https://{}:{PORT}", w.net.addr("a"));
    // `guest-prepare` at the agent: the appliance boots there and waits.
    let body = r#"{"key":"r1/solo","instance":"solo","disks":[{"store":"image","name":"solo-guest.raw","format":"raw"}]}"#;
    let cmd = [
        "curl",
        "-sk",
        "--max-time",
        "300",
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        "-H",
        "content-type: application/json",
        "-d",
        body,
        &format!("{a}/v1/guests/prepare"),
    ];
    let o = w.net.command("orch", &[], &cmd).output().unwrap();
    let prepared: serde_json::Value =
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert!(
        prepared["launch_seconds"].as_f64().unwrap() > 0.0,
        "{prepared}"
    );
    let running = processes_naming("solo-guest.raw");
    assert!(
        running.iter().any(|p| p.contains("qemu")),
        "no appliance holds the disk: {running:?}"
    );
    // SIGTERM: the agent exits, and its waiting appliance with it.
    let (status, _) = w.terminate_agent("a");
    assert!(status.success(), "the agent exited with {status}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_naming("solo-guest.raw");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the appliance outlived its agent: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
