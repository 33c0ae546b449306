//! Stages a generated directory and compares the rate with `cp -r` and
//! `cp -r; sync` of the same directory on the same disk, in the same run.
//!
//! `cargo run --release -p cohort-agent --example stage_bench -- --size-mib 2048 --files 64 --rounds 3`
//!
//! Nothing is dropped from the page cache (that needs root): `cp` runs first
//! and both read a warm cache, so this measures copy + hashing + flush cost,
//! not the source's disk or network. Each round runs `cp -r`, then `sync`,
//! then the Stager into a fresh cache, with a `sync` before each; the medians
//! are printed with the load average, since other work on the machine moves
//! the figures. A last staging of the same, unchanged source shows the
//! source's record reused (no byte read).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use cohort_agent::stage::{StageItem, Stager};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Size of the generated directory, in MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// How many files it is split into (in 4 subdirectories).
    #[arg(long, default_value_t = 64)]
    files: u64,
    /// Files the Stager copies at once (default: the cores available).
    #[arg(long)]
    parallel: Option<usize>,
    /// Rounds of cp / cp; sync / Stager; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the temporary directory goes (default: $TMPDIR or /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Use (and keep) this source directory, generated there if it does not
    /// exist: runs of two builds can then alternate on the same files.
    #[arg(long)]
    source: Option<PathBuf>,
}

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.files > 0 && args.size_mib > 0 && args.rounds > 0,
        "--files, --size-mib and --rounds must be positive"
    );
    let parallel = args.parallel.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let base = match &args.dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    println!("load average at start: {}", load_average());
    println!(
        "SHA-256 (sha2, one thread, 1 GiB in memory): {:.0} MiB/s; CPU SHA extensions: {}",
        hash_rate(),
        sha_extensions()
    );
    let src = args.source.clone().unwrap_or_else(|| base.path().join("src"));
    let bytes = if src.exists() {
        let bytes = dir_bytes(&src)?;
        println!("source: {:.0} MiB already in {}", bytes as f64 / MIB as f64, src.display());
        bytes
    } else {
        let bytes = generate(&src, args.size_mib * MIB, args.files)?;
        println!("generated {:.0} MiB in {} files under {}", bytes as f64 / MIB as f64, args.files, src.display());
        // The source's files must be older than the record's settle time to be trusted.
        std::thread::sleep(Duration::from_secs(3));
        bytes
    };
    let mib = bytes as f64 / MIB as f64;
    sync()?;

    let (mut cp, mut cp_sync, mut staged, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut digest = String::new();
    let mut stager = Stager::new(base.path().join("cache"), parallel);
    for round in 0..args.rounds {
        let copy = base.path().join("cp-copy");
        let started = Instant::now();
        let status = Command::new("cp").arg("-r").arg(&src).arg(&copy).status().context("run cp")?;
        ensure!(status.success(), "cp -r failed: {status}");
        cp.push(started.elapsed().as_secs_f64());
        // cp does not fsync; its data reaching the disk is timed apart, for a fair comparison.
        sync()?;
        cp_sync.push(started.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&copy)?;
        sync()?;

        let cache = base.path().join(format!("cache-{round}"));
        stager = Stager::new(cache, parallel);
        let (started, cpu_before) = (Instant::now(), cpu_seconds());
        let result = stage(&stager, &src).await?;
        staged.push(started.elapsed().as_secs_f64());
        cpu.push(cpu_seconds() - cpu_before);
        digest = result.0;
        println!(
            "round {round}: cp -r {:.2} s, cp -r; sync {:.2} s, Stager {:.2} s (CPU {:.2} s), ratio to cp -r; sync {:.2}  (load {})",
            cp[round],
            cp_sync[round],
            staged[round],
            cpu[round],
            cp_sync[round] / staged[round],
            load_average()
        );
    }
    let read_before = stager.source_bytes_read();
    let started = Instant::now();
    let (again, from_cache) = stage(&stager, &src).await?;
    let again_secs = started.elapsed().as_secs_f64();
    ensure!(again == digest, "the second staging found another digest");

    let ratios: Vec<f64> = cp_sync.iter().zip(&staged).map(|(c, s)| c / s).collect();
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (best_cp_sync, best_staged) = (best(&cp_sync), best(&staged));
    let (cp, cp_sync, stage_secs, cpu) = (median(cp), median(cp_sync), median(staged), median(cpu));
    println!(
        "page cache: warm for all (source read before); `sync` before each run; medians of {} rounds",
        args.rounds
    );
    println!("cp -r           : {cp:6.2} s  {:8.1} MiB/s  (no hashing, no fsync)", mib / cp);
    println!("cp -r; sync     : {cp_sync:6.2} s  {:8.1} MiB/s  (data on disk)", mib / cp_sync);
    println!(
        "Stager ({parallel:2} par): {stage_secs:6.2} s  {:8.1} MiB/s  (SHA-256 of every byte, on disk before the marker)",
        mib / stage_secs
    );
    println!(
        "ratio Stager/cp : {:.2} (vs cp; sync: {:.2}; median of the rounds' own ratios: {:.2})",
        cp / stage_secs,
        cp_sync / stage_secs,
        median(ratios)
    );
    println!(
        "best of rounds  : cp -r; sync {best_cp_sync:.2} s ({:.1} MiB/s), Stager {best_staged:.2} s ({:.1} MiB/s), ratio {:.2}",
        mib / best_cp_sync,
        mib / best_staged,
        best_cp_sync / best_staged
    );
    println!("Stager CPU time : {cpu:6.2} s user+sys ({:.0} MiB per CPU second)", mib / cpu);
    println!(
        "again, unchanged: {again_secs:6.3} s  from cache: {from_cache}, source bytes read: {}",
        stager.source_bytes_read() - read_before
    );
    println!("manifest digest : {digest}");
    println!("load average at end: {}", load_average());
    Ok(())
}

/// Stages `src` without a declared digest; its digest and whether it was found cached.
async fn stage(stager: &Stager, src: &Path) -> anyhow::Result<(String, bool)> {
    let (tx, mut rx) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let item = StageItem { name: "bench".into(), source: src.display().to_string(), sha256: None, model: None };
    let staged = stager.stage(&[item], tx).await?;
    drain.await?;
    let first = staged.first().context("nothing staged")?;
    Ok((first.sha256.clone(), first.from_cache))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Bytes in the regular files under `dir`.
fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += dir_bytes(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// User and system CPU time of this process so far (all its threads).
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let (user, system) = (u.user_time(), u.system_time());
        user.tv_sec() as f64 + user.tv_usec() as f64 / 1e6 + system.tv_sec() as f64 + system.tv_usec() as f64 / 1e6
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn hash_rate() -> f64 {
    let buffer = vec![0x5au8; 1 << 30];
    let started = Instant::now();
    let mut hasher = Sha256::new();
    for chunk in buffer.chunks(MIB as usize) {
        hasher.update(chunk);
    }
    std::hint::black_box(hasher.finalize());
    1024.0 / started.elapsed().as_secs_f64()
}

fn sha_extensions() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("sha");
    #[cfg(target_arch = "aarch64")]
    return std::arch::is_aarch64_feature_detected!("sha2");
    #[allow(unreachable_code)]
    false
}

/// Writes `files` files of pseudo-random bytes, `total` in all, spread over 4
/// subdirectories.
fn generate(root: &Path, total: u64, files: u64) -> anyhow::Result<u64> {
    let per_file = total / files;
    let mut block = vec![0u8; MIB as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut written = 0;
    for i in 0..files {
        let dir = root.join(format!("part-{}", i % 4));
        std::fs::create_dir_all(&dir)?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("shard-{i:05}.bin")))?);
        let mut left = per_file;
        while left > 0 {
            for word in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            let n = left.min(MIB);
            file.write_all(&block[..n as usize])?;
            left -= n;
        }
        file.flush()?;
        written += per_file;
    }
    Ok(written)
}

fn sync() -> anyhow::Result<()> {
    let status = Command::new("sync").status().context("run sync")?;
    ensure!(status.success(), "sync failed: {status}");
    Ok(())
}
