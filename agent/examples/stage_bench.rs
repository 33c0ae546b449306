//! Stages a generated directory and compares the rate with `cp -r` of the same
//! directory on the same disk.
//!
//! `cargo run --release -p cohort-agent --example stage_bench -- --size-mib 512`
//!
//! Nothing is dropped from the page cache (that needs root): `cp` runs first
//! and both read a warm cache, so this measures copy + hashing + fsync cost,
//! not the source's disk or network.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, ensure};
use clap::Parser;
use cohort_agent::stage::{StageItem, Stager};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Size of the generated directory, in MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// How many files it is split into (in 4 subdirectories).
    #[arg(long, default_value_t = 64)]
    files: u64,
    /// Files the Stager copies at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Where the temporary directory goes (default: $TMPDIR or /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.files > 0 && args.size_mib > 0, "--files and --size-mib must be positive");
    let base = match &args.dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let src = base.path().join("src");
    let bytes = generate(&src, args.size_mib * MIB, args.files)?;
    let mib = bytes as f64 / MIB as f64;
    println!("generated {mib:.0} MiB in {} files under {}", args.files, base.path().display());
    sync()?;

    let started = Instant::now();
    let status = Command::new("cp").arg("-r").arg(&src).arg(base.path().join("cp-copy")).status().context("run cp")?;
    ensure!(status.success(), "cp -r failed: {status}");
    let cp_secs = started.elapsed().as_secs_f64();
    // cp does not fsync; its data reaching the disk is timed apart, for a fair comparison.
    sync()?;
    let cp_sync_secs = started.elapsed().as_secs_f64();

    let stager = Stager::new(base.path().join("cache"), args.parallel);
    let (tx, mut rx) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let item = StageItem { name: "bench".into(), source: src.display().to_string(), sha256: None };
    let started = Instant::now();
    let staged = stager.stage(&[item], tx).await?;
    let stage_secs = started.elapsed().as_secs_f64();
    drain.await?;
    let digest = staged.first().map(|s| s.sha256.as_str()).unwrap_or_default();

    println!("page cache: warm for both (cp ran first, nothing dropped); `sync` before each run");
    println!("cp -r           : {cp_secs:6.2} s  {:8.1} MiB/s  (no hashing, no fsync)", mib / cp_secs);
    println!("cp -r; sync     : {cp_sync_secs:6.2} s  {:8.1} MiB/s  (data on disk)", mib / cp_sync_secs);
    println!(
        "Stager ({:2} par): {stage_secs:6.2} s  {:8.1} MiB/s  (SHA-256 of every byte, fsync of every file)",
        args.parallel,
        mib / stage_secs
    );
    println!("ratio Stager/cp : {:.2} (vs cp; sync: {:.2})", cp_secs / stage_secs, cp_sync_secs / stage_secs);
    println!("manifest digest : {digest}");
    Ok(())
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
