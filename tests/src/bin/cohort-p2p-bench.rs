//! Fan-out of a staged input over real agents on loopback (issue 18): each
//! node's upload limited to one link's rate by `tc` (an HTB class per node
//! address on `lo`), one node holding the input, N others fetching it at
//! once from it and from each other. One node's time is the same fetch with
//! N = 1 (the whole input over one limited link); the goal is 8 nodes within
//! 1.3x of it. Needs root (tc) and changes `lo`'s queueing while it runs
//! (removed at the end): run it alone, not beside the tests.
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
}

/// A directory of `files` files of distinct content; returns its digest.
fn make_input(dir: &Path, files: usize, file_bytes: usize) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let mut lines = Vec::new();
    for i in 0..files {
        let rel = format!("shard-{i:03}.bin");
        let mut bytes = vec![0u8; file_bytes];
        let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for chunk in bytes.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(dir.join(&rel), &bytes)?;
        lines.push(format!("{:x} {} {rel}\n", Sha256::digest(&bytes), bytes.len()));
    }
    // The manifest lists files sorted by path: `shard-NNN.bin` are made in that order.
    Ok(format!("{:x}", Sha256::digest(lines.concat().as_bytes())))
}

/// Limits what each node address sends on `lo`; removed when dropped.
struct Shaping;

impl Shaping {
    fn apply(addresses: &[String], mbit: u32) -> anyhow::Result<Shaping> {
        let tc = |args: &str| -> anyhow::Result<()> {
            let status = Command::new("tc").args(args.split_whitespace()).status().context("running tc")?;
            if !status.success() {
                bail!("tc {args} failed");
            }
            Ok(())
        };
        let _ =
            Command::new("tc").args(["qdisc", "del", "dev", "lo", "root"]).stderr(std::process::Stdio::null()).status();
        tc("qdisc add dev lo root handle 1: htb default 999 r2q 1000")?;
        tc("class add dev lo parent 1: classid 1:999 htb rate 100gbit")?;
        for (i, addr) in addresses.iter().enumerate() {
            let class = 10 + i;
            tc(&format!("class add dev lo parent 1: classid 1:{class} htb rate {mbit}mbit ceil {mbit}mbit"))?;
            // A short queue under each class, as a switch port has (the
            // default one of 1,000 packets of lo's 64 KiB holds seconds of
            // traffic, behind which every small message would wait).
            tc(&format!("qdisc add dev lo parent 1:{class} handle {class}: bfifo limit 262144"))?;
            tc(&format!("filter add dev lo parent 1: protocol ip prio 1 u32 match ip src {addr}/32 flowid 1:{class}"))?;
        }
        Ok(Shaping)
    }
}

impl Drop for Shaping {
    fn drop(&mut self) {
        let _ = Command::new("tc").args(["qdisc", "del", "dev", "lo", "root"]).status();
    }
}

fn job(name: &str, nodes: usize, group: &str, source: &Path, digest: &str) -> String {
    format!(
        "name: {name}\nkind: command\nnodes: {nodes}\ngpus_per_node: 1\nstop_grace: 1s\nnode_selector: {{grp: {group}}}\n\
         stage: [{{name: model, source: {}, sha256: {digest}}}]\ncommand: ['true']\n",
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
            ..NodeSpec::loopback(i, 1)
        })
        .collect();
    let cluster = Cluster::start(nodes).await?;
    let seeded = cluster.submit(&job("seed", 1, "seed", source, digest)).await?;
    let seeded = cluster.wait_finished(&seeded.id, Duration::from_secs(600)).await?;
    if state(&seeded) != JobState::Succeeded {
        bail!("seeding failed: {}", seeded.reason);
    }
    let addresses: Vec<String> = cluster.nodes.iter().map(|n| n.address.clone()).collect();
    let _shaping = Shaping::apply(&addresses, args.link_mbit)?;
    let started = Instant::now();
    let fetch = cluster.submit(&job("fetch", fetchers, "fetch", source, digest)).await?;
    // Staged everywhere once the attempt leaves Preparing; `true` ends at once after.
    let done = cluster.wait_finished(&fetch.id, Duration::from_secs(1200)).await?;
    let seconds = started.elapsed().as_secs_f64();
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
    let source: PathBuf = work.path().join("model");
    let bytes = (args.files * args.file_mib) << 20;
    let digest = make_input(&source, args.files, args.file_mib << 20)?;
    let link = f64::from(args.link_mbit) * 1e6 / 8.0;
    println!(
        "input {} files, {} MiB; every node's upload {} Mbit/s ({:.1} s for the input over one link)",
        args.files,
        bytes >> 20,
        args.link_mbit,
        bytes as f64 / link
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
