//! Times the staging cache's garbage collection: lists N cached directories
//! (F files each) and collects half of them, least recently used first.
//!
//! cargo run --release -p cohort-agent --example cache_gc_bench -- [N] [F] [DIR]
//! (defaults 2000 entries, 8 files of 4 KiB; DIR: a temporary directory)

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use cohort_agent::stage::gc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let entries: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let files: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(8);
    let tmp = tempfile::tempdir_in(args.next().unwrap_or_else(|| std::env::temp_dir().display().to_string()))?;
    let cache = tmp.path();
    let made = Instant::now();
    for i in 0..entries {
        let hex = format!("{:064x}", i + 1);
        let dir = cache.join("sha256").join(&hex);
        std::fs::create_dir_all(dir.join("sub"))?;
        for f in 0..files {
            std::fs::write(dir.join("sub").join(format!("f{f}")), vec![i as u8; 4096])?;
        }
        std::fs::write(cache.join("sha256").join(format!("{hex}.manifest")), b"m")?;
        gc::record_use(cache, &dir);
        let used = std::fs::File::options().write(true).open(cache.join("sha256").join(format!("{hex}.used")))?;
        used.set_modified(SystemTime::now() - Duration::from_secs((entries - i) as u64))?;
    }
    println!("made {entries} entries of {files} files in {:.2?}", made.elapsed());
    let listed = Instant::now();
    let list = gc::list(cache)?;
    let total: u64 = list.iter().map(|e| e.bytes).sum();
    println!("listed {} entries ({} bytes) in {:.2?}", list.len(), total, listed.elapsed());
    let collected = Instant::now();
    let report = gc::collect(cache, total / 2, &HashSet::new())?;
    println!(
        "collected {} entries ({} -> {} bytes) in {:.2?}",
        report.removed.len(),
        report.bytes_before,
        report.bytes_after,
        collected.elapsed()
    );
    let again = Instant::now();
    let report = gc::collect(cache, total / 2, &HashSet::new())?;
    println!("a collection with nothing to remove ({} entries) took {:.2?}", gc::list(cache)?.len(), again.elapsed());
    assert!(report.removed.is_empty());
    Ok(())
}
