//! Times matching on a synthetic problem: `cargo run --release -p
//! fluidcloud-broker --example match_bench -- [UNITS] [SITES] [CONSTRAINTS]`.
//!
//! Generates (from a fixed seed) UNITS instances linked in small groups,
//! SITES sites spread over Europe and North America with mixed formats,
//! prices and capacities, and CONSTRAINTS constraints of every kind, then
//! prints one line: `units sites constraints seconds optimal|heuristic total`.

use std::time::Instant;

use fluidcloud_broker::Constraint;
use fluidcloud_broker::placement::{Request, Unit, UnitKind, solve};
use fluidcloud_plugins::{
    ArtifactKind, Capability, Capacity, Cost, ImageFormat, Location, MigratorDescriptor, SiteInfo,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n_units, n_sites, n_cons) = (
        args.first().copied().unwrap_or(1000),
        args.get(1).copied().unwrap_or(500),
        args.get(2).copied().unwrap_or(50),
    );
    let mut rng = Rng(42);
    let mut sites = vec![site(
        "source",
        48.85,
        2.35,
        "EU/FR",
        0.03,
        &[ImageFormat::Qcow2],
        None,
    )];
    let jurisdictions = ["EU/FR", "EU/DE", "EU/NL", "US/VA", "US/OR", "CA/QC"];
    for i in 0..n_sites {
        let (lat, lon) = if i % 3 == 2 {
            (30.0 + rng.unit() * 18.0, -120.0 + rng.unit() * 50.0)
        } else {
            (40.0 + rng.unit() * 15.0, -5.0 + rng.unit() * 25.0)
        };
        let jur = jurisdictions[rng.below(jurisdictions.len() as u64) as usize];
        let formats: &[ImageFormat] = match rng.below(3) {
            0 => &[ImageFormat::Raw],
            1 => &[ImageFormat::Qcow2, ImageFormat::Raw],
            _ => &[ImageFormat::Vmdk, ImageFormat::Raw],
        };
        let cap = 16 + rng.below(240) as u32;
        sites.push(site(
            &format!("site-{i:03}"),
            lat,
            lon,
            jur,
            0.01 + rng.unit() * 0.05,
            formats,
            Some(cap),
        ));
    }
    let units: Vec<Unit> = (0..n_units)
        .map(|i| {
            let group = i / 4;
            let peers = (group * 4..(group * 4 + 4).min(n_units))
                .filter(|&j| j != i)
                .map(|j| format!("vm-{j:04}"))
                .collect();
            Unit {
                name: format!("vm-{i:04}"),
                kind: UnitKind::Instance,
                vcpus: 1 + rng.below(4) as u32,
                memory_mib: 1024 * (1 + rng.below(8)),
                storage_bytes: (10 + rng.below(90)) << 30,
                move_bytes: (1 + rng.below(20)) << 30,
                image_format: Some(if rng.below(2) == 0 {
                    ImageFormat::Qcow2
                } else {
                    ImageFormat::Raw
                }),
                members: vec![],
                peers,
            }
        })
        .collect();
    let pick = |rng: &mut Rng, k: usize| -> String {
        let start = rng.below(n_units as u64) as usize;
        (0..k)
            .map(|j| format!("vm-{:04}", (start + j * 7) % n_units))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut constraints: Vec<Constraint> = Vec::new();
    for c in 0..n_cons {
        let text = match c % 6 {
            0 => format!(
                "ban({}; site-{:03},site-{:03})",
                pick(&mut rng, 5),
                rng.below(n_sites as u64),
                rng.below(n_sites as u64)
            ),
            1 => {
                let sites: Vec<String> = (0..40)
                    .map(|_| format!("site-{:03}", rng.below(n_sites as u64)))
                    .collect();
                format!("fence({}; {})", pick(&mut rng, 3), sites.join(","))
            }
            2 => format!("spread({})", pick(&mut rng, 4)),
            3 => format!("gather({})", pick(&mut rng, 2)),
            4 => format!("latency({}; 25)", pick(&mut rng, 3)),
            _ => format!("jurisdiction({}; EU)", pick(&mut rng, 6)),
        };
        constraints.push(text.parse().expect("generated constraint parses"));
    }
    if std::env::var_os("MATCH_BENCH_SHOW").is_some() {
        for c in &constraints {
            eprintln!("{c}");
        }
    }
    let mut req = Request::new("source");
    req.constraints = constraints;
    let img = |format| ArtifactKind::DiskImage { format };
    let migrators = [MigratorDescriptor {
        name: "image-convert".into(),
        version: "0".into(),
        summary: String::new(),
        consumes: vec![img(ImageFormat::Qcow2), img(ImageFormat::Raw)],
        produces: vec![img(ImageFormat::Raw), img(ImageFormat::Vmdk)],
    }];
    let start = Instant::now();
    let result = solve(&units, &sites, &req, &migrators);
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(p) => println!(
            "{n_units} {n_sites} {n_cons} {secs:.3} {} {:.1}",
            if p.optimal { "optimal" } else { "heuristic" },
            p.total
        ),
        Err(e) => {
            println!("{n_units} {n_sites} {n_cons} {secs:.3} failed {e}");
            std::process::exit(1);
        }
    }
}

fn site(
    name: &str,
    lat: f64,
    lon: f64,
    jur: &str,
    price: f64,
    formats: &[ImageFormat],
    vcpus: Option<u32>,
) -> SiteInfo {
    SiteInfo {
        name: name.into(),
        kind: "local".into(),
        location: Location {
            region: name.into(),
            latitude: lat,
            longitude: lon,
        },
        jurisdiction: jur.into(),
        cost: Cost {
            vcpu_hour: price,
            memory_gib_hour: price / 8.0,
            storage_gib_month: price,
            egress_gib: 0.02,
            ..Cost::default()
        },
        capacity: Capacity {
            vcpus,
            memory_mib: vcpus.map(|v| u64::from(v) * 4096),
            storage_gib: Some(100_000),
        },
        image_formats: formats.iter().copied().collect(),
        capabilities: Capability::ALL.into_iter().collect(),
        rtt_ms: None,
    }
}
