//! Fan-out of a staged input over real agents on loopback (issue 18): each
//! node's upload limited to one link's rate by `tc` (an HTB class per node
//! address on `lo`), one node holding the input, N others fetching it at
//! once from it and from each other. One node's time is the same fetch with
//! N = 1 (the whole input over one limited link); the goal is 8 nodes within
//! 1.3x of it. Needs root (tc) and changes `lo`'s queueing while it runs
//! (removed at the end): run it alone, not beside the tests. With
//! `--unpinned` the input has no `sha256:` and nobody holds it before: the
//! job runs on N + 1 nodes, one reads the source and the N others wait for
//! the digest it finds, then fetch.
//!
//! `cargo build --release -p cohort-tests --bins && target/release/cohort-p2p-bench --nodes 1,2,4,8`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, state};
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Args {
    /// Fetching nodes per run.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    nodes: Vec<usize>,
    /// Files of the input.
    #[arg(long, default_value_t = 64)]
    files: usize,
    /// MiB per file.
    #[arg(long, default_value_t = 4)]
    file_mib: usize,
    /// Each node's upload rate, Mbit/s.
    #[arg(long, default_value_t = 200)]
    link_mbit: u32,
    /// The agents' `--peer-piece-mib`: files larger than this travel in
    /// pieces of it (default: the agent's, 64).
    #[arg(long)]
    piece_mib: Option<u64>,
    /// Limit each node's download to its link's rate too (an `ifb` device
    /// fed by `lo`'s ingress, an HTB class per destination address), as a
    /// full-duplex NIC does; without it only uploads are limited.
    #[arg(long)]
    duplex: bool,
    /// The input without `sha256:`: no node holds it before; the job runs
    /// on node 0 too, one node reads the source (the local disk, not
    /// limited) and the others wait for its digest, then fetch.
    #[arg(long)]
    unpinned: bool,
    /// The input is one file of `--files` x `--file-mib` MiB (a dataset, a
    /// tarball: content whose digest is the file's own), not a directory.
    #[arg(long)]
    single_file: bool,
}

/// A directory of `files` files of distinct content; returns its digest.
fn make_input(dir: &Path, files: usize, file_bytes: usize) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let mut lines = Vec::new();
    for i in 0..files {
        let rel = format!("shard-{i:03}.bin");
        let bytes = file_bytes_of(i, file_bytes);
        std::fs::write(dir.join(&rel), &bytes)?;
        lines.push(format!("{:x} {} {rel}\n", Sha256::digest(&bytes), bytes.len()));
    }
    // The manifest lists files sorted by path: `shard-NNN.bin` are made in that order.
    Ok(format!("{:x}", Sha256::digest(lines.concat().as_bytes())))
}

/// One file of `bytes` bytes at `path`; returns its digest (the content's).
fn make_file(path: &Path, bytes: usize) -> anyhow::Result<String> {
    let bytes = file_bytes_of(0, bytes);
    std::fs::write(path, &bytes)?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// `len` bytes of xorshift noise, distinct per `i`.
fn file_bytes_of(i: usize, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    bytes
}

/// Limits what each node address sends on `lo` (and, `duplex`, what it
/// receives, on an `ifb` device); removed when dropped.
struct Shaping;

/// The device that takes `lo`'s ingress to limit downloads.
const IFB: &str = "cohort-ifb0";

fn run(program: &str, args: &str) -> anyhow::Result<()> {
    let status = Command::new(program).args(args.split_whitespace()).status().context("running tc")?;
    if !status.success() {
        bail!("{program} {args} failed");
    }
    Ok(())
}

/// An HTB tree on `dev` with a class of `mbit` per address, matched on its
/// `side` (`src` or `dst`).
fn limit_per_address(dev: &str, addresses: &[String], mbit: u32, side: &str) -> anyhow::Result<()> {
    let tc = |args: String| run("tc", &args);
    tc(format!("qdisc add dev {dev} root handle 1: htb default 999 r2q 1000"))?;
    tc(format!("class add dev {dev} parent 1: classid 1:999 htb rate 100gbit"))?;
    for (i, addr) in addresses.iter().enumerate() {
        let class = 10 + i;
        tc(format!("class add dev {dev} parent 1: classid 1:{class} htb rate {mbit}mbit ceil {mbit}mbit"))?;
        // A short queue under each class, as a switch port has (the
        // default one of 1,000 packets of lo's 64 KiB holds seconds of
        // traffic, behind which every small message would wait).
        tc(format!("qdisc add dev {dev} parent 1:{class} handle {class}: bfifo limit 262144"))?;
        tc(format!(
            "filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip {side} {addr}/32 flowid 1:{class}"
        ))?;
    }
    Ok(())
}

impl Shaping {
    fn apply(addresses: &[String], mbit: u32, duplex: bool) -> anyhow::Result<Shaping> {
        Shaping::remove();
        let shaping = Shaping;
        limit_per_address("lo", addresses, mbit, "src")?;
        if duplex {
            run("ip", &format!("link add {IFB} type ifb"))?;
            run("ip", &format!("link set {IFB} up"))?;
            run("tc", "qdisc add dev lo handle ffff: ingress")?;
            run(
                "tc",
                &format!(
                    "filter add dev lo parent ffff: protocol ip u32 match u32 0 0 action mirred egress redirect dev {IFB}"
                ),
            )?;
            limit_per_address(IFB, addresses, mbit, "dst")?;
        }
        Ok(shaping)
    }

    fn remove() {
        let quiet = |program: &str, args: &[&str]| {
            let _ = Command::new(program).args(args).stderr(std::process::Stdio::null()).status();
        };
        quiet("tc", &["qdisc", "del", "dev", "lo", "root"]);
        quiet("tc", &["qdisc", "del", "dev", "lo", "ingress"]);
        quiet("ip", &["link", "del", IFB]);
    }
}

/// Bytes each node's class has sent so far (`tc -s class show dev lo`), by node index.
fn sent_per_node(nodes: usize) -> Vec<u64> {
    let mut sent = vec![0; nodes];
    let Ok(out) = Command::new("tc").args(["-s", "class", "show", "dev", "lo"]).output() else { return sent };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut class = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("class htb 1:") {
            class = rest.split_whitespace().next().and_then(|c| c.parse::<usize>().ok());
        } else if let Some(rest) = line.trim_start().strip_prefix("Sent ")
            && let Some(i) = class.take().and_then(|c| c.checked_sub(10))
            && i < nodes
        {
            sent[i] = rest.split_whitespace().next().and_then(|b| b.parse().ok()).unwrap_or(0);
        }
    }
    sent
}

/// Samples every node's upload while a fan-out runs: per node, the bytes sent
/// and the share of samples in which it sent at least half its link's rate.
struct Uploads {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<u64>, Vec<u32>, u32)>,
}

const SAMPLE: Duration = Duration::from_millis(250);

impl Uploads {
    fn start(nodes: usize, mbit: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let half = f64::from(mbit) * 1e6 / 8.0 * SAMPLE.as_secs_f64() / 2.0;
        let thread = std::thread::spawn(move || {
            let first = sent_per_node(nodes);
            let mut last = first.clone();
            let mut busy = vec![0u32; nodes];
            let mut samples = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(SAMPLE);
                let now = sent_per_node(nodes);
                for i in 0..nodes {
                    if now[i].saturating_sub(last[i]) as f64 >= half {
                        busy[i] += 1;
                    }
                }
                samples += 1;
                last = now;
            }
            let total = last.iter().zip(&first).map(|(l, f)| l.saturating_sub(*f)).collect();
            (total, busy, samples)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (Vec<u64>, Vec<u32>, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

impl Drop for Shaping {
    fn drop(&mut self) {
        Shaping::remove();
    }
}

/// A job on `nodes` nodes of `group` (any, without one) staging `source`
/// (pinned to `digest` when there is one).
fn job(name: &str, nodes: usize, group: Option<&str>, source: &Path, digest: Option<&str>) -> String {
    let selector = group.map(|g| format!("node_selector: {{grp: {g}}}\n")).unwrap_or_default();
    let pin = digest.map(|d| format!(", sha256: {d}")).unwrap_or_default();
    format!(
        "name: {name}\nkind: command\nnodes: {nodes}\ngpus_per_node: 1\nstop_grace: 1s\n{selector}\
         stage: [{{name: model, source: {}{pin}}}]\ncommand: ['true']\n",
        source.display()
    )
}

struct Run {
    nodes: usize,
    seconds: f64,
    from_peers: u64,
    from_source_nodes: usize,
}

async fn fan_out(args: &Args, fetchers: usize, source: &Path, digest: &str) -> anyhow::Result<Run> {
    // node0 holds the input (staged from the source before the shaping);
    // node1..=N fetch it.
    let nodes: Vec<NodeSpec> = (0..=fetchers)
        .map(|i| NodeSpec {
            labels: format!("grp={}", if i == 0 { "seed" } else { "fetch" }),
            extra_args: args.piece_mib.map(|m| vec!["--peer-piece-mib".to_owned(), m.to_string()]).unwrap_or_default(),
            ..NodeSpec::loopback(i, 1)
        })
        .collect();
    let cluster = Cluster::start(nodes).await?;
    if !args.unpinned {
        let seeded = cluster.submit(&job("seed", 1, Some("seed"), source, Some(digest))).await?;
        let seeded = cluster.wait_finished(&seeded.id, Duration::from_secs(600)).await?;
        if state(&seeded) != JobState::Succeeded {
            bail!("seeding failed: {}", seeded.reason);
        }
    }
    let addresses: Vec<String> = cluster.nodes.iter().map(|n| n.address.clone()).collect();
    let _shaping = Shaping::apply(&addresses, args.link_mbit, args.duplex)?;
    let started = Instant::now();
    let uploads = Uploads::start(addresses.len(), args.link_mbit);
    let fetch = match args.unpinned {
        false => job("fetch", fetchers, Some("fetch"), source, Some(digest)),
        true => job("fetch", fetchers + 1, None, source, None),
    };
    let fetch = cluster.submit(&fetch).await?;
    // Staged everywhere once the attempt leaves Preparing; `true` ends at once after.
    let done = cluster.wait_finished(&fetch.id, Duration::from_secs(1200)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let (sent, busy, samples) = uploads.finish();
    let busy: Vec<String> =
        busy.iter().zip(&sent).map(|(b, s)| format!("{}% {}M", 100 * b / samples.max(1), s >> 20)).collect();
    println!("    uploads (busy share, MiB sent), node 0 first: {}", busy.join(", "));
    if state(&done) != JobState::Succeeded {
        bail!("fan-out to {fetchers} failed: {}", done.reason);
    }
    Ok(Run {
        nodes: fetchers,
        seconds,
        from_peers: done.staging.iter().map(|s| s.bytes_from_peers).sum(),
        from_source_nodes: done.staging.iter().filter(|s| s.bytes_from_peers == 0 && s.state != "cached").count(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    let bytes = (args.files * args.file_mib) << 20;
    let (source, digest) = if args.single_file {
        let file = work.path().join("data.bin");
        let digest = make_file(&file, bytes)?;
        (file, digest)
    } else {
        let dir: PathBuf = work.path().join("model");
        let digest = make_input(&dir, args.files, args.file_mib << 20)?;
        (dir, digest)
    };
    let link = f64::from(args.link_mbit) * 1e6 / 8.0;
    println!(
        "input {} {} MiB; every node's upload{} {} Mbit/s ({:.1} s for the input over one link); pieces of {} MiB",
        if args.single_file { "one file of".to_owned() } else { format!("{} files,", args.files) },
        bytes >> 20,
        if args.duplex { " and download" } else { "" },
        args.link_mbit,
        bytes as f64 / link,
        args.piece_mib.unwrap_or(64)
    );
    println!("{:>6} {:>10} {:>12} {:>14} {:>16}", "nodes", "seconds", "x one node", "from peers", "read the source");
    let mut one = None;
    for &n in &args.nodes {
        let run = fan_out(&args, n, &source, &digest).await?;
        let base = *one.get_or_insert(run.seconds);
        println!(
            "{:>6} {:>10.2} {:>12.2} {:>13.0}% {:>16}",
            run.nodes,
            run.seconds,
            run.seconds / base,
            100.0 * run.from_peers as f64 / (bytes as f64 * run.nodes as f64),
            run.from_source_nodes
        );
    }
    Ok(())
}
