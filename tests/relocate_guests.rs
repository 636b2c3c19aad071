//! Inside guests: libvirt guests with real root filesystems, looked into
//! by introspection and adapted by a relocation (`conduit/src/guest`).
//!
//! Each guest is `scripts/libvirt rootfs-disk`: an MBR disk with one ext4
//! partition holding busybox and an `/etc` written here (a static address
//! in `/etc/network/interfaces`, its NIC named by MAC in a systemd `.link`
//! file, an app config naming the other guest by host name, fstab by
//! UUID). Its init names the NIC, runs `ifup -a` and prints its address,
//! gateway, app config and hosts on the serial console.
//!
//! These tests fail, never skip, when libvirtd or libguestfs cannot run.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::libvirt::{AgentPair, Pool, console_log, libvirt_up, repo, sha256_file, state, virsh};
use common::{fails, ok, relocation_id};
use serde_json::Value;

/// A guest of the test service.
struct Guest {
    name: &'static str,
    ip: &'static str,
    mac: &'static str,
    /// The filesystem's UUID (fstab and the kernel command line name it).
    uuid: &'static str,
    /// Files of its `/etc` (and elsewhere), over the base system.
    files: Vec<(&'static str, String)>,
    /// Its address in `/etc/network/interfaces` (else the NIC is only
    /// named there, `manual`).
    static_interfaces: bool,
}

fn web() -> Guest {
    Guest {
        name: "web",
        ip: "10.10.0.21",
        mac: "52:54:00:aa:00:21",
        uuid: "0f0e0d0c-1111-2222-3333-444455556621",
        files: vec![
            (
                "etc/app/app.yaml",
                "# the shop's web front\ndatabase:\n  host: db.shop.internal # primary\n  port: 5432\n"
                    .into(),
            ),
            (
                "etc/hosts",
                "127.0.0.1 localhost\n10.10.0.22 db.shop.internal db\n".into(),
            ),
            // Outside /etc: found because the manifest's [guest] dirs say so.
            (
                "opt/app/etc/worker.ini",
                "[queue]\nurl = amqp://db.shop.internal:5672/\n".into(),
            ),
        ],
        static_interfaces: true,
    }
}

fn db() -> Guest {
    Guest {
        name: "db",
        ip: "10.10.0.22",
        mac: "52:54:00:aa:00:22",
        uuid: "0f0e0d0c-1111-2222-3333-444455556622",
        files: vec![
            (
                "etc/app/db.yaml",
                "listen: 0.0.0.0\nallow:\n  - web.shop.internal\n".into(),
            ),
            // Its network set by a script, a format fluidcloud does not
            // know: its address is rewritten (the file names the guest),
            // its gateway is not, and the relocation says so.
            (
                "etc/local.d/net.start",
                "#!/bin/sh\nip link set app0 up\nip addr add 10.10.0.22/24 dev app0\nip route add default via 10.10.0.1\n"
                    .into(),
            ),
        ],
        static_interfaces: false,
    }
}

impl Guest {
    /// Its base `/etc`: network settings, the `.link` file, fstab.
    fn tree(&self, dir: &Path) -> PathBuf {
        let tree = dir.join(format!("tree-{}", self.name));
        let _ = std::fs::remove_dir_all(&tree);
        let mut files = vec![
            (
                "etc/network/interfaces",
                if self.static_interfaces {
                    format!(
                        "auto lo\niface lo inet loopback\n\nauto app0\niface app0 inet static\n    address {}\n    netmask 255.255.255.0\n    gateway 10.10.0.1\n",
                        self.ip
                    )
                } else {
                    "auto lo\niface lo inet loopback\n\niface app0 inet manual\n".to_owned()
                },
            ),
            (
                "etc/systemd/network/10-app0.link",
                format!("[Match]\nMACAddress={}\n\n[Link]\nName=app0\n", self.mac),
            ),
            (
                "etc/fstab",
                format!("UUID={} / ext4 defaults 0 1\n", self.uuid),
            ),
            (".uuid", self.uuid.to_owned()),
        ];
        files.extend(self.files.iter().map(|(p, c)| (*p, c.clone())));
        for (p, c) in files {
            let f = tree.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, c).unwrap();
        }
        tree
    }
}

fn script(args: &[&str]) {
    let out = Command::new(repo().join("scripts/libvirt"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/libvirt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Source pool A with the service's guests, target pool B, the sites file.
struct World {
    dir: PathBuf,
    config: String,
    /// When set, every command runs in the orchestrator's namespace and
    /// reaches both pools through their agents (dropped before the pools).
    agents: Option<AgentPair>,
    a: Pool,
    b: Pool,
}

impl World {
    /// `adapt`: the target's `adapt` table (TOML inline table).
    fn new(tag: &str, adapt: &str) -> Self {
        libvirt_up();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("guests-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        fluidcloud_testkit::scratch(&dir);
        let boot = dir.join("boot");
        script(&["rootfs-guest", boot.to_str().unwrap()]);
        let a = Pool::new(format!("fcg-{tag}-a"));
        let b = Pool::new(format!("fcg-{tag}-b"));
        std::fs::copy(boot.join("vmlinuz"), a.dir.join("vmlinuz")).unwrap();
        std::fs::copy(boot.join("initrd-root.img"), a.dir.join("initrd.img")).unwrap();
        let site = |name: &str, pool: &Pool, extra: &str| {
            format!(
                r#"[sites.{name}]
kind = "libvirt"
uri = "qemu:///system"
pool = "{pool}"
domain_prefix = "{prefix}"
shutdown_timeout_s = 0
accel = "tcg"
change_tracking = false
jurisdiction = "EU/FR"
image_formats = ["raw"]
location = {{ region = "lab", latitude = 48.1, longitude = -1.7 }}
{extra}
"#,
                pool = pool.name,
                prefix = pool.prefix()
            )
        };
        let config = format!(
            "{}{}",
            site(
                "lv-a",
                &a,
                "internal_domains = [\"shop.internal\"]\nsubnet = \"10.10.0.0/24\""
            ),
            site(
                "lv-b",
                &b,
                &format!(
                    "internal_domains = [\"edge.internal\"]\nsubnet = \"10.30.0.0/24\"\nadapt = {adapt}"
                )
            ),
        );
        let config_path = dir.join("fluidcloud.toml");
        std::fs::write(&config_path, config).unwrap();
        Self {
            dir,
            config: config_path.to_str().unwrap().to_owned(),
            agents: None,
            a,
            b,
        }
    }

    /// [`Self::new`], both sites reached through agents in network
    /// namespaces (`AgentPair`): the orchestrator sees neither pool.
    fn through_agents(tag: &str, adapt: &str) -> Self {
        let mut w = Self::new(tag, adapt);
        w.agents = Some(AgentPair::start(
            &format!("fc-g-{tag}"),
            Path::new(&w.config),
            &w.dir,
            &w.a,
            &w.b,
        ));
        w
    }

    /// Defines guest `g` of `service` in pool A (its disk `NAME.raw`
    /// holding `disk`, or the guest's own root filesystem, on the virtio
    /// bus), started when `start`.
    fn guest(&self, g: &Guest, service: &str, disk: Option<&Path>, start: bool) -> PathBuf {
        self.guest_on(g, service, disk, start, "virtio")
    }

    /// [`Self::guest`] with its disk on `bus` (`virtio`, `sata`).
    fn guest_on(
        &self,
        g: &Guest,
        service: &str,
        disk: Option<&Path>,
        start: bool,
        bus: &str,
    ) -> PathBuf {
        let file = self.a.dir.join(format!("{}.raw", g.name));
        match disk {
            Some(d) => {
                std::fs::copy(d, &file).unwrap();
            }
            None => {
                let tree = g.tree(&self.dir);
                script(&[
                    "rootfs-disk",
                    tree.to_str().unwrap(),
                    file.to_str().unwrap(),
                ]);
            }
        }
        virsh(&["pool-refresh", &self.a.name]);
        let domain = format!("{}{}", self.a.prefix(), g.name);
        let _ = std::fs::remove_file(console_log(&domain));
        let xml = format!(
            r#"<domain type='qemu'>
  <name>{domain}</name>
  <metadata><fc:instance xmlns:fc='https://fluidcloud.dev/xmlns/instance/1'>
    <fc:service>{service}</fc:service><fc:hostname>{name}.shop.internal</fc:hostname>
    <fc:address>{ip}</fc:address>
  </fc:instance></metadata>
  <memory unit='MiB'>160</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{a}/vmlinuz</kernel><initrd>{a}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet root=UUID={uuid}</cmdline></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{file}'/><target dev='{dev}' bus='{bus}'/></disk>
    <interface type='user'><mac address='{mac}'/><model type='virtio'/></interface>
    <serial type='file'><source path='{log}' append='off'/><target port='0'/></serial>
  </devices>
</domain>"#,
            name = g.name,
            ip = g.ip,
            uuid = g.uuid,
            mac = g.mac,
            a = self.a.dir.display(),
            file = file.display(),
            dev = if bus == "virtio" { "vda" } else { "sda" },
            log = console_log(&domain).display()
        );
        let xml_path = self.dir.join(format!("{}.xml", g.name));
        std::fs::write(&xml_path, xml).unwrap();
        virsh(&["define", xml_path.to_str().unwrap()]);
        if start {
            virsh(&["start", &domain]);
        }
        file
    }

    fn fc(&self, args: &[&str]) -> std::process::Output {
        if let Some(agents) = &self.agents {
            return agents.fc(args);
        }
        let mut all = vec!["--config", &self.config];
        all.extend_from_slice(args);
        common::run_in(&self.dir, &all)
    }
}

/// The console of `domain` once it printed `FLUIDCLOUD-UP`.
fn console_up(domain: &str) -> String {
    let log = console_log(domain);
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("FLUIDCLOUD-UP") {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{domain} did not come up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The resource ids an edge of `relation` leads to from `from`.
fn edges_from(t: &Value, from: &str, relation: &str) -> Vec<String> {
    t["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["from"] == from && e["relation"] == relation)
        .map(|e| e["to"].as_str().unwrap().to_owned())
        .collect()
}

/// Whether a config file's references lead to `instance`.
fn config_reaches(t: &Value, config: &str, instance: &str) -> bool {
    edges_from(t, config, "references-endpoint")
        .iter()
        .any(|ep| edges_from(t, ep, "resolves-to").contains(&instance.to_owned()))
}

#[test]
fn two_guests_are_introspected_inside_and_relocated_to_another_subnet_with_new_macs() {
    introspect_and_relocate_the_pair(&World::new("pair", r#"{ mac = "generate" }"#));
}

/// The same through site agents: the guests are looked into and adapted
/// at the agents, next to their disks (the orchestrator cannot see the
/// pools, so it could not have opened them).
#[test]
fn two_guests_at_sites_reached_through_agents_are_looked_into_and_adapted_there() {
    introspect_and_relocate_the_pair(&World::through_agents("apair", r#"{ mac = "generate" }"#));
}

fn introspect_and_relocate_the_pair(w: &World) {
    let web_disk = w.guest(&web(), "shop", None, true);
    let db_disk = w.guest(&db(), "shop", None, true);
    let (src_web, src_db) = (
        format!("{}web", w.a.prefix()),
        format!("{}db", w.a.prefix()),
    );
    let console = console_up(&src_web);
    assert!(
        console.contains("FLUIDCLOUD-IP app0 10.10.0.21/24"),
        "{console}"
    );
    console_up(&src_db);
    // The guests wrote what they write at boot (atime, the journal).
    std::thread::sleep(Duration::from_secs(6));
    let before = [sha256_file(&web_disk), sha256_file(&db_disk)];

    // Introspection reads their /etc, and the directory the manifest
    // declares, and links their config files.
    let manifest = w.dir.join("shop.toml");
    std::fs::write(
        &manifest,
        "name = \"shop\"\n\n[guest]\ndirs = [\"/opt/app/etc\"]\n",
    )
    .unwrap();
    let manifest = manifest.to_str().unwrap();
    let t: Value = serde_json::from_str(&ok(&w.fc(&[
        "introspect",
        "lv-a",
        "--service",
        "shop",
        "--manifest",
        manifest,
        "--json",
    ])))
    .unwrap();
    let ids: Vec<&str> = t["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for id in [
        "config:web:/etc/app/app.yaml",
        "config:db:/etc/app/db.yaml",
        "config:web:/opt/app/etc/worker.ini",
    ] {
        assert!(ids.contains(&id), "{id} not in {ids:?}");
    }
    assert!(
        config_reaches(&t, "config:web:/etc/app/app.yaml", "instance:db"),
        "web's app config does not reach db: {t}"
    );
    assert!(
        config_reaches(&t, "config:db:/etc/app/db.yaml", "instance:web"),
        "db's config does not reach web: {t}"
    );
    assert!(
        config_reaches(&t, "config:web:/etc/hosts", "instance:db"),
        "{t}"
    );
    assert!(
        config_reaches(&t, "config:web:/opt/app/etc/worker.ini", "instance:db"),
        "{t}"
    );
    let web_res = t["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "instance:web")
        .unwrap();
    assert_eq!(web_res["spec"]["guest"]["os"], "linux", "{web_res}");

    // The relocation to another subnet, with new MACs.
    let started = Instant::now();
    let out = ok(&w.fc(&[
        "relocate",
        "--from",
        "lv-a",
        "--service",
        "shop",
        "--manifest",
        manifest,
        "--to",
        "lv-b",
        "--yes",
    ]));
    eprintln!(
        "relocation: {:.1} s\n{out}",
        started.elapsed().as_secs_f64()
    );
    let id = relocation_id(&out);
    assert!(
        out.contains("db: its address is set in /etc/local.d/net.start, a network configuration fluidcloud does not know")
            && out.contains("10.10.0.1 of the old network stayed"),
        "the unknown network format is not reported:\n{out}"
    );
    let (web_b, db_b) = (
        format!("{}web", w.b.prefix()),
        format!("{}db", w.b.prefix()),
    );
    assert_eq!(state(&web_b), "running");
    let web_console = console_up(&web_b);
    for line in [
        "FLUIDCLOUD-IP app0 10.30.0.21/24",
        "FLUIDCLOUD-GW 10.30.0.1",
        "FLUIDCLOUD-CONF /etc/app/app.yaml:   host: db.edge.internal # primary",
        "FLUIDCLOUD-HOSTS 10.30.0.22 db.edge.internal db",
    ] {
        assert!(
            web_console.contains(line),
            "no `{line}` on web's console:\n{web_console}"
        );
    }
    let db_console = console_up(&db_b);
    for line in [
        "FLUIDCLOUD-IP app0 10.30.0.22/24",
        "FLUIDCLOUD-CONF /etc/app/db.yaml:   - web.edge.internal",
        // The gateway the warning named is not in the new network.
        "FLUIDCLOUD-LOCAL ip: RTNETLINK answers: Network is unreachable",
    ] {
        assert!(
            db_console.contains(line),
            "no `{line}` on db's console:\n{db_console}"
        );
    }
    // New MACs, which the guests' .link files now name.
    let xml = virsh(&["dumpxml", &web_b]);
    assert!(!xml.contains(web().mac), "{xml}");
    // The sources stopped, their disks untouched.
    assert_eq!(state(&src_web), "shut off");
    assert_eq!([sha256_file(&web_disk), sha256_file(&db_disk)], before);

    // The report: every in-guest diff, and the adaptation in the downtime.
    let rep: Value = serde_json::from_str(&ok(&w.fc(&["--json", "report", &id]))).unwrap();
    let configs = rep["config"].as_array().unwrap();
    let app = configs
        .iter()
        .find(|c| c["target"] == "lv-b:web:/etc/app/app.yaml")
        .unwrap_or_else(|| panic!("no app.yaml diff in {configs:?}"));
    let diff = app["diff"].as_str().unwrap();
    assert!(
        diff.contains("-  host: db.shop.internal # primary"),
        "{diff}"
    );
    assert!(
        diff.contains("+  host: db.edge.internal # primary"),
        "{diff}"
    );
    let worker = configs
        .iter()
        .find(|c| c["target"] == "lv-b:web:/opt/app/etc/worker.ini")
        .unwrap_or_else(|| panic!("no worker.ini diff in {configs:?}"));
    assert!(
        worker["diff"]
            .as_str()
            .unwrap()
            .contains("+url = amqp://db.edge.internal:5672/"),
        "{worker}"
    );
    for path in [
        "lv-b:web:/etc/network/interfaces",
        "lv-b:web:/etc/systemd/network/10-app0.link",
        "lv-b:db:/etc/local.d/net.start",
    ] {
        assert!(
            configs.iter().any(|c| c["target"] == path),
            "no diff for {path} in {configs:?}"
        );
    }
    let stages = rep["downtime_stages"].as_array().unwrap();
    let adapt = stages
        .iter()
        .find(|s| s["stage"] == "guest adaptation")
        .unwrap_or_else(|| panic!("no guest adaptation stage in {stages:?}"));
    let seconds = adapt["seconds"].as_f64().unwrap();
    eprintln!("downtime {}: {stages:?}", rep["downtime_seconds"]);
    assert!(seconds > 0.0 && seconds < rep["downtime_seconds"].as_f64().unwrap());
}

/// A disk of `mib` MiB: an MBR with one partition from 1 MiB holding
/// `partition`'s bytes.
fn partitioned(dir: &Path, name: &str, partition: &Path, mib: u64) -> PathBuf {
    let disk = dir.join(name);
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(mib << 20).unwrap();
    drop(f);
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"start=2048, type=83\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    let data = std::fs::read(partition).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    use std::io::{Seek as _, SeekFrom};
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&data).unwrap();
    disk
}

#[test]
fn an_encrypted_or_unrecognised_guest_stops_the_relocation_before_the_source_stops() {
    let w = World::new("bad", r#"{ mac = "generate" }"#);
    // A LUKS2 partition, and one of random bytes.
    let luks = w.dir.join("luks.img");
    std::fs::write(&luks, vec![0u8; 24 << 20]).unwrap();
    let key = w.dir.join("key");
    std::fs::write(&key, "not a secret of anyone\n").unwrap();
    let out = Command::new("cryptsetup")
        .args(["luksFormat", "--batch-mode", "--type", "luks2"])
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .arg("--key-file")
        .arg(&key)
        .arg(&luks)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cryptsetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vault_disk = partitioned(&w.dir, "vault-src.raw", &luks, 32);
    let junk = w.dir.join("junk.img");
    common::random_file(&junk, 8 << 20);
    let junk_disk = partitioned(&w.dir, "junk-src.raw", &junk, 16);

    let mut vault = db();
    vault.name = "vault";
    let mut junky = web();
    junky.name = "junk";
    let vault_file = w.guest(&vault, "vault", Some(&vault_disk), false);
    let junk_file = w.guest(&junky, "junk", Some(&junk_disk), false);
    let before = [sha256_file(&vault_file), sha256_file(&junk_file)];

    // Introspection says what it found inside.
    let t: Value = serde_json::from_str(&ok(&w.fc(&[
        "introspect",
        "lv-a",
        "--service",
        "vault",
        "--json",
    ])))
    .unwrap();
    let v = t["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "instance:vault")
        .unwrap()
        .clone();
    let problem = v["spec"]["guest"]["problem"].as_str().unwrap_or_default();
    assert!(problem.contains("encrypted (LUKS)"), "{v}");

    for (service, why) in [
        ("vault", "encrypted (LUKS)"),
        ("junk", "fluidcloud can read"),
    ] {
        let out = w.fc(&[
            "relocate",
            "--from",
            "lv-a",
            "--service",
            service,
            "--to",
            "lv-b",
            "--yes",
        ]);
        let err = fails(&out, 1);
        assert!(err.contains(why), "{service}: {err}");
        assert!(err.contains("guest-prepare"), "{service}: {err}");
        // Nothing reached cut-over: the target never ran; its rollback
        // leaves pool B as it was.
        let domain = format!("{}{service}", w.b.prefix());
        assert_eq!(state(&domain), "shut off", "{service}");
        ok(&w.fc(&["rollback", &relocation_id(&common::stdout(&out))]));
        assert_eq!(state(&domain), "undefined", "{service}");
        let vols = virsh(&["vol-list", "--pool", &w.b.name]);
        assert!(!vols.contains(".raw"), "{service}: left in pool B:\n{vols}");
    }
    assert_eq!(
        [sha256_file(&vault_file), sha256_file(&junk_file)],
        before,
        "the sources were touched"
    );
    assert_eq!(state(&format!("{}vault", w.a.prefix())), "shut off");
}

#[test]
fn a_guest_moving_from_sata_to_virtio_gets_fstab_by_uuid_a_fresh_cloud_init_and_an_initramfs_warning()
 {
    let w = World::new("bus", r#"{ disk_bus = "virtio", cloud_init_reset = true }"#);
    // An initramfs with no virtio_blk (a gzipped cpio holding one file).
    let initrd = w.dir.join("initrd-novirtio.img");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "d=$(mktemp -d) && echo '#!/bin/sh' > $d/init && (cd $d && echo init | cpio -o -H newc --quiet | gzip) > {} && rm -r $d",
            initrd.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut g = web();
    g.name = "legacy";
    g.files = vec![
        // fstab by device name, as on its old SATA disk.
        ("etc/fstab", "/dev/sda1 / ext4 defaults 0 1\n".into()),
        ("var/lib/cloud/instance/boot-finished", "1\n".into()),
        (
            "var/lib/cloud/instances/i-0123/datasource",
            "DataSourceNoCloud\n".into(),
        ),
        (
            "var/lib/cloud/seed/nocloud/meta-data",
            "instance-id: i-0123\n".into(),
        ),
    ];
    let tree = g.tree(&w.dir);
    std::fs::create_dir_all(tree.join("boot")).unwrap();
    std::fs::copy(&initrd, tree.join("boot/initrd.img-6.1.0-legacy")).unwrap();
    let built = w.dir.join("legacy-built.raw");
    script(&[
        "rootfs-disk",
        tree.to_str().unwrap(),
        built.to_str().unwrap(),
    ]);
    let source = w.guest_on(&g, "legacy", Some(&built), false, "sata");
    let before = sha256_file(&source);

    let out = ok(&w.fc(&[
        "relocate",
        "--from",
        "lv-a",
        "--service",
        "legacy",
        "--to",
        "lv-b",
        "--yes",
    ]));
    assert!(
        out.contains("/boot/initrd.img-6.1.0-legacy holds no virtio_blk module"),
        "{out}"
    );
    let target = format!("{}legacy", w.b.prefix());
    let xml = virsh(&["dumpxml", &target]);
    assert!(xml.contains("bus='virtio'"), "{xml}");
    let console = console_up(&target);
    for line in [
        format!("FLUIDCLOUD-ROOT UUID={}", g.uuid),
        "FLUIDCLOUD-IP app0 10.30.0.21/24".to_owned(),
        // cloud-init's instance state is gone, its seed kept.
        "FLUIDCLOUD-CLOUD seed ".to_owned(),
    ] {
        assert!(
            console.contains(&line),
            "no `{line}` on the console:\n{console}"
        );
    }
    assert_eq!(sha256_file(&source), before, "the source was touched");
}

#[test]
fn a_relocation_killed_between_prepare_and_adapt_resumes_stops_the_stale_appliance_and_adapts() {
    use std::io::BufRead as _;
    let w = World::new("resume", r#"{ mac = "generate" }"#);
    let disk = w.guest(&web(), "solo", None, true);
    console_up(&format!("{}web", w.a.prefix()));
    std::thread::sleep(Duration::from_secs(6));
    let before = sha256_file(&disk);

    let mut child = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .current_dir(&w.dir)
        .env_remove("FLUIDCLOUD_CONFIG")
        .args(["--config", &w.config, "relocate", "--from", "lv-a"])
        .args(["--service", "solo", "--to", "lv-b", "--yes"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("succeeded guest-prepare:web") {
            break;
        }
    }
    assert!(seen.contains("succeeded guest-prepare:web"), "{seen}");
    // SIGKILL: nothing of the process runs any more; its appliance does.
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let id = relocation_id(&String::from_utf8_lossy(&out.stdout));
    let pids = std::env::temp_dir().join("fluidcloud-guests");
    let pid_file = std::fs::read_dir(&pids)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(&id))
        .unwrap_or_else(|| panic!("no appliance PID file for {id} in {}", pids.display()));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(pid), "the appliance died with the process");

    // The resume stops it and adapts with an appliance of its own.
    let out = ok(&w.fc(&["resume", &id]));
    assert!(out.contains("succeeded"), "{out}");
    assert!(!alive(pid), "the stale appliance {pid} still runs");
    assert!(!pid_file.exists());
    let console = console_up(&format!("{}web", w.b.prefix()));
    assert!(
        console.contains("FLUIDCLOUD-IP app0 10.30.0.21/24"),
        "{console}"
    );
    assert_eq!(sha256_file(&disk), before, "the source was touched");
}
