//! Issue 18, item 2: peer-to-peer staging. Real controller and agents on
//! loopback, each node its own address and cache, mutual TLS between the
//! agents (node certificates from `cohort-controller init`'s CA). A
//! directory input with its digest: one node of a gang reads the source,
//! the others fetch from it and from each other; a later job on another
//! node gets it from the holders with the source gone; a holder whose copy
//! is corrupt is reported and routed around; a dead holder is routed around.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::{Job, JobState, StageStatus};
use cohort_tests::{Cluster, NodeSpec, state};
use sha2::{Digest, Sha256};

const FILES: usize = 24;
const FILE_BYTES: usize = 192 << 10;

/// A directory of `FILES` files of distinct content; returns (dir, digest).
fn input(root: &Path) -> (PathBuf, String) {
    let dir = root.join("model");
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    let mut lines = Vec::new();
    for i in 0..FILES {
        let rel = if i % 2 == 0 { format!("shards/part-{i:02}.bin") } else { format!("part-{i:02}.bin") };
        let bytes: Vec<u8> = (0..FILE_BYTES).map(|b| ((b * 31 + i * 7) % 251) as u8).collect();
        std::fs::write(dir.join(&rel), &bytes).unwrap();
        lines.push(format!("{:x} {} {rel}\n", Sha256::digest(&bytes), bytes.len()));
    }
    // Modes the digest does not cover, which a copy from peers keeps all the same.
    std::fs::set_permissions(dir.join("part-01.bin"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("shards"), std::fs::Permissions::from_mode(0o750)).unwrap();
    // The manifest: one line per file, sorted bytewise by path.
    lines.sort_by(|a, b| a.split(' ').nth(2).unwrap().as_bytes().cmp(b.split(' ').nth(2).unwrap().as_bytes()));
    (dir, format!("{:x}", Sha256::digest(lines.concat().as_bytes())))
}

fn nodes(n: usize) -> Vec<NodeSpec> {
    (0..n)
        .map(|i| NodeSpec {
            labels: format!("slot=n{i},grp={}", if i < 4 { "a" } else { "b" }),
            ..NodeSpec::loopback(i, 1)
        })
        .collect()
}

/// [`nodes`] whose files larger than 1 MiB travel in pieces of 1 MiB.
fn nodes_in_pieces_of_1_mib(n: usize) -> Vec<NodeSpec> {
    let mut specs = nodes(n);
    for spec in &mut specs {
        spec.extra_args.extend(["--peer-piece-mib".to_owned(), "1".to_owned()]);
    }
    specs
}

fn job(name: &str, nodes: usize, selector: Option<&str>, source: &Path, digest: &str) -> String {
    let selector = selector.map(|s| format!("node_selector: {{{s}}}\n")).unwrap_or_default();
    format!(
        "name: {name}\nkind: command\nnodes: {nodes}\ngpus_per_node: 1\nstop_grace: 1s\n{selector}\
         stage: [{{name: model, source: {}, sha256: {digest}}}]\ncommand: ['true']\n",
        source.display()
    )
}

async fn run(cluster: &Cluster, yaml: &str) -> Job {
    let submitted = cluster.submit(yaml).await.unwrap();
    let done = cluster.wait_finished(&submitted.id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
    done
}

/// The content as node `i` has it in its cache, if complete.
fn cached(cluster: &Cluster, i: usize, digest: &str) -> Option<PathBuf> {
    let cache = cluster.dir.path().join(format!("node{i}")).join("cache").join("sha256");
    cache.join(format!("{digest}.manifest")).exists().then(|| cache.join(digest))
}

/// The same bytes, and the same modes for the files and the `shards` directory.
fn same_files(a: &Path, b: &Path) {
    let mode = |p: PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
    for i in 0..FILES {
        let rel = if i % 2 == 0 { format!("shards/part-{i:02}.bin") } else { format!("part-{i:02}.bin") };
        assert_eq!(std::fs::read(a.join(&rel)).unwrap(), std::fs::read(b.join(&rel)).unwrap(), "{rel}");
        assert_eq!(mode(a.join(&rel)), mode(b.join(&rel)), "the mode of {rel} in {}", b.display());
    }
    assert_eq!(mode(a.join("shards")), mode(b.join("shards")), "the mode of shards/ in {}", b.display());
}

fn status<'a>(job: &'a Job, node: &str) -> &'a StageStatus {
    job.staging.iter().find(|s| s.node_name == node).unwrap()
}

const TOTAL: u64 = (FILES * FILE_BYTES) as u64;

#[tokio::test(flavor = "multi_thread")]
async fn one_node_reads_the_source_the_gang_fetches_from_each_other_and_later_jobs_from_the_holders() {
    let cluster = Cluster::start(nodes(6)).await.unwrap();
    let (source, digest) = input(cluster.dir.path());

    // A gang of 4: one node reads the source, three fetch from their peers.
    let first = run(&cluster, &job("gang", 4, Some("grp: a"), &source, &digest)).await;
    assert_eq!(first.staging.len(), 4, "{:?}", first.staging);
    let from_source: Vec<&StageStatus> = first.staging.iter().filter(|s| s.bytes_from_peers == 0).collect();
    assert_eq!(from_source.len(), 1, "exactly one node reads the source: {:?}", first.staging);
    assert_eq!(from_source[0].state, "ready", "copied, not found cached: {:?}", from_source[0]);
    for s in first.staging.iter().filter(|s| s.bytes_from_peers > 0) {
        assert_eq!(s.bytes_from_peers, TOTAL, "the whole input from peers on {}: {s:?}", s.node_name);
        assert!(s.corrupt_peers.is_empty(), "{s:?}");
    }
    let gang: Vec<usize> =
        first.staging.iter().map(|s| s.node_name.trim_start_matches("node").parse().unwrap()).collect();
    for &i in &gang {
        same_files(&source, &cached(&cluster, i, &digest).unwrap_or_else(|| panic!("node{i} has it")));
    }

    // The source goes away: a job on a node outside the gang gets the input
    // from the holders all the same.
    let outside = 4;
    let moved = cluster.dir.path().join("model-gone");
    std::fs::rename(&source, &moved).unwrap();
    let second = run(&cluster, &job("later", 1, Some("slot: n4"), &source, &digest)).await;
    let s = status(&second, &format!("node{outside}"));
    assert_eq!(s.bytes_from_peers, TOTAL, "from peers, the source untouched (it is gone): {s:?}");
    same_files(&moved, &cached(&cluster, outside, &digest).unwrap());

    // Every holder's copy but the source puller's goes bad on disk: the next
    // node that fetches finds out, names the peers that served bad files and
    // gets good ones from the one that is left.
    let bad: Vec<String> = first
        .staging
        .iter()
        .filter(|s| s.bytes_from_peers > 0)
        .map(|s| s.node_name.clone())
        .chain(["node4".into()])
        .collect();
    for node in &bad {
        let copy = cluster.dir.path().join(node).join("cache").join("sha256").join(&digest);
        for i in 0..FILES {
            let rel = if i % 2 == 0 { format!("shards/part-{i:02}.bin") } else { format!("part-{i:02}.bin") };
            std::fs::write(copy.join(&rel), vec![0u8; FILE_BYTES]).unwrap();
        }
    }
    let third = run(&cluster, &job("after-corruption", 1, Some("slot: n5"), &source, &digest)).await;
    let s = status(&third, "node5");
    assert_eq!(s.bytes_from_peers, TOTAL, "{s:?}");
    assert!(!s.corrupt_peers.is_empty(), "4 of 5 peers serve bad files: some were asked and named: {s:?}");
    assert!(s.corrupt_peers.iter().all(|p| bad.contains(p)), "only peers with bad copies are named: {s:?}");
    same_files(&moved, &cached(&cluster, 5, &digest).unwrap());
}

/// An input without `sha256:`: one node of the gang reads the source, the
/// others wait for the digest it found and fetch the input from it and from
/// each other. The same job again: the nodes that waited find that digest in
/// their caches and copy nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_input_without_a_digest_is_read_by_one_node_and_fetched_from_it_by_the_others() {
    let cluster = Cluster::start(nodes(4)).await.unwrap();
    let (source, digest) = input(cluster.dir.path());
    let yaml = format!(
        "name: unpinned\nkind: command\nnodes: 4\ngpus_per_node: 1\nstop_grace: 1s\n\
         stage: [{{name: model, source: {}}}]\ncommand: ['true']\n",
        source.display()
    );
    let first = run(&cluster, &yaml).await;
    assert_eq!(first.staging.len(), 4, "{:?}", first.staging);
    let from_source: Vec<&StageStatus> = first.staging.iter().filter(|s| s.bytes_from_peers == 0).collect();
    assert_eq!(from_source.len(), 1, "exactly one node reads the source: {:?}", first.staging);
    let reader = from_source[0].node_name.clone();
    for s in first.staging.iter().filter(|s| s.node_name != reader) {
        assert_eq!(s.bytes_from_peers, TOTAL, "the whole input from peers on {}: {s:?}", s.node_name);
    }
    for i in 0..4 {
        same_files(&source, &cached(&cluster, i, &digest).unwrap_or_else(|| panic!("node{i} has it")));
    }

    let second = run(&cluster, &yaml.replace("name: unpinned", "name: again")).await;
    for s in second.staging.iter().filter(|s| s.node_name != reader) {
        assert_eq!((s.state.as_str(), s.bytes_from_peers), ("cached", 0), "{s:?}");
    }
}

/// The node reading the source fails the input (the source is not the
/// content the job pins): the nodes fetching from it stop waiting once
/// nobody left can bring them a file (the other fetcher says it fetches
/// too) and read the source themselves, failing the same way, rather than
/// waiting out the 60 s stall for files that cannot come.
#[tokio::test(flavor = "multi_thread")]
async fn when_the_source_reader_fails_its_fetchers_read_the_source_without_stalling() {
    let cluster = Cluster::start(nodes(3)).await.unwrap();
    let (source, _) = input(cluster.dir.path());
    let wrong = "e".repeat(64);
    let submitted = cluster.submit(&job("wrong", 3, None, &source, &wrong)).await.unwrap();
    let done = cluster.wait_finished(&submitted.id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(state(&done), JobState::Failed, "{}", done.reason);
    assert!(done.reason.contains("sha256 mismatch"), "{}", done.reason);
    let logs: String =
        (0..3).map(|i| std::fs::read_to_string(cluster.dir.path().join(format!("node{i}.log"))).unwrap()).collect();
    assert!(logs.contains("no peer could serve it"), "the fetchers gave up on their peers: {logs}");
    assert!(!logs.contains("nothing came from any peer"), "no fetcher waited out the stall: {logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_holder_is_routed_around() {
    let mut cluster = Cluster::start(nodes(3)).await.unwrap();
    let (source, digest) = input(cluster.dir.path());
    run(&cluster, &job("two", 2, Some("grp: a"), &source, &digest)).await;
    let holders: Vec<usize> = (0..3).filter(|i| cached(&cluster, *i, &digest).is_some()).collect();
    assert_eq!(holders.len(), 2);
    let outside = (0..3).find(|i| !holders.contains(i)).unwrap();
    // One holder's agent dies (kill -9); the controller still counts it
    // connected for its TTL, so the next job is told to fetch from it too.
    cluster.kill_agent(holders[0]);
    std::fs::rename(&source, cluster.dir.path().join("model-gone")).unwrap();
    let next = run(&cluster, &job("next", 1, Some(&format!("slot: n{outside}")), &source, &digest)).await;
    let s = status(&next, &format!("node{outside}"));
    assert_eq!(s.bytes_from_peers, TOTAL, "from the live holder: {s:?}");
    same_files(&cluster.dir.path().join("model-gone"), &cached(&cluster, outside, &digest).unwrap());
}

/// The controller learns what the nodes' caches hold when their sessions
/// open: after it restarts (SIGKILL), a job on a node without the input
/// fetches it from the node that staged it before the restart, with the
/// source gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_controller_sends_peers_to_what_was_staged_before_it() {
    let mut cluster = Cluster::start(nodes(2)).await.unwrap();
    let (source, digest) = input(cluster.dir.path());
    run(&cluster, &job("before", 1, Some("slot: n0"), &source, &digest)).await;
    assert!(cached(&cluster, 0, &digest).is_some() && cached(&cluster, 1, &digest).is_none());

    cluster.kill_controller_at(0);
    // The restarted controller appends to the same log.
    let before = cluster.controller_log().len();
    cluster.restart_controller_at(0).unwrap();
    let names: Vec<String> = (0..2).map(|i| format!("node{i}")).collect();
    cluster.wait_nodes_ready(&names, Duration::from_secs(60)).await.unwrap();
    let learnt = |log: String| {
        log.get(before..).unwrap_or_default().lines().any(|l| {
            l.contains("learnt what the node's caches hold") && l.contains("node0") && !l.contains("contents=0")
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !learnt(cluster.controller_log()) {
        assert!(std::time::Instant::now() < deadline, "never learnt node0's cache:\n{}", cluster.controller_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved = cluster.dir.path().join("model-gone");
    std::fs::rename(&source, &moved).unwrap();
    let after = run(&cluster, &job("after", 1, Some("slot: n1"), &source, &digest)).await;
    let s = status(&after, "node1");
    assert_eq!(s.bytes_from_peers, TOTAL, "from node0, the source untouched (it is gone): {s:?}");
    same_files(&moved, &cached(&cluster, 1, &digest).unwrap());
}

/// Files larger than the piece size (1 MiB here) travel in pieces: a gang
/// of 4 with one node reading the source gets a model of two 3.5 MiB shards
/// and a small file; the fetchers take the shards piece by piece (from the
/// reader, which hashed them by piece, and from each other) and end with the
/// same bytes. A later node fetches from holders that are complete (their
/// pieces hashed when it asks) with the source gone.
#[tokio::test(flavor = "multi_thread")]
async fn large_files_travel_in_pieces() {
    let cluster = Cluster::start(nodes_in_pieces_of_1_mib(5)).await.unwrap();
    let dir = cluster.dir.path().join("big-model");
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("config.json", b"{\"model_type\": \"qwen3\"}\n".to_vec()),
        ("model-00001-of-00002.safetensors", (0..7u32 << 19).map(|i| (i % 253) as u8).collect()),
        ("model-00002-of-00002.safetensors", (0..7u32 << 19).map(|i| (i % 241) as u8 ^ 0x5a).collect()),
    ];
    let mut lines = String::new();
    for (rel, bytes) in &files {
        std::fs::write(dir.join(rel), bytes).unwrap();
        lines.push_str(&format!("{:x} {} {rel}\n", Sha256::digest(bytes), bytes.len()));
    }
    let digest = format!("{:x}", Sha256::digest(lines.as_bytes()));
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let check = |i: usize| {
        let copy = cached(&cluster, i, &digest).unwrap_or_else(|| panic!("node{i} has it"));
        for (rel, bytes) in &files {
            assert!(std::fs::read(copy.join(rel)).unwrap() == *bytes, "node{i}: {rel}");
        }
    };
    let log = |i: usize| std::fs::read_to_string(cluster.dir.path().join(format!("node{i}.log"))).unwrap_or_default();
    // The pieces each fetcher took, from its log line.
    let pieces = |i: usize| -> u32 {
        let log = log(i);
        let line = log.lines().rfind(|l| l.contains("fetched from peers")).unwrap_or_else(|| panic!("node{i}: {log}"));
        line.split("pieces=").nth(1).and_then(|p| p.split_whitespace().next()).unwrap().parse().unwrap()
    };

    let first = run(&cluster, &job("gang", 4, Some("grp: a"), &dir, &digest)).await;
    let fetchers: Vec<&StageStatus> = first.staging.iter().filter(|s| s.bytes_from_peers > 0).collect();
    assert_eq!(fetchers.len(), 3, "one node reads the source: {:?}", first.staging);
    for s in &fetchers {
        assert_eq!(s.bytes_from_peers, total, "{s:?}");
        let i: usize = s.node_name.trim_start_matches("node").parse().unwrap();
        check(i);
        // 2 shards of 3.5 MiB: 4 pieces each.
        assert_eq!(pieces(i), 8, "node{i} took the shards in pieces");
    }

    let moved = cluster.dir.path().join("big-model-gone");
    std::fs::rename(&dir, &moved).unwrap();
    let later = run(&cluster, &job("later", 1, Some("slot: n4"), &dir, &digest)).await;
    assert_eq!(status(&later, "node4").bytes_from_peers, total);
    check(4);
    assert_eq!(pieces(4), 8, "the holders, complete, offered the shards in pieces");
}

/// A directory served over HTTP on loopback by Python's own `http.server`
/// (a real server, one log line per request on stderr), at most `rate`
/// bytes a second per response (0: as fast as it can); killed when dropped.
struct HttpSource {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl HttpSource {
    fn start(dir: &Path, log: PathBuf, rate: u64) -> Self {
        use std::io::BufRead;
        let script = "import functools, http.server, sys, time\n\
                      rate = int(sys.argv[2])\n\
                      class Paced(http.server.SimpleHTTPRequestHandler):\n\
                      \x20   def copyfile(self, source, out):\n\
                      \x20       while chunk := source.read(1 << 20):\n\
                      \x20           out.write(chunk)\n\
                      \x20           if rate: time.sleep(len(chunk) / rate)\n\
                      handler = functools.partial(Paced, directory=sys.argv[1])\n\
                      server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)\n\
                      print(server.server_address[1], flush=True)\n\
                      server.serve_forever()\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(dir)
            .arg(rate.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        Self { child, port: line.trim().parse().unwrap(), log }
    }

    /// The addresses that asked for `path`, one per GET.
    fn getters(&self, path: &str) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap();
        log.lines()
            .filter(|l| l.contains(&format!("\"GET {path} ")))
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    }
}

impl Drop for HttpSource {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A single file and a URL travel between nodes as a directory does: a
/// pinned file of 3.5 MiB is read by one node of the gang, the others fetch
/// it from it in pieces (checked against the file's own digest, which is
/// the content's); a URL without a digest is downloaded by one node (one
/// GET in the server's log) and fetched from it by the three others. Each
/// node ends with the file under the input's name in its cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_and_a_url_are_read_from_their_source_once_and_travel_between_nodes() {
    let cluster = Cluster::start(nodes_in_pieces_of_1_mib(4)).await.unwrap();
    let served = cluster.dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let data: Vec<u8> = (0..7u32 << 19).map(|i| (i % 251) as u8 ^ 0x3c).collect();
    let corpus: Vec<u8> = (0..40_000u32).flat_map(|i| format!("{{\"text\": \"row {i}\"}}\n").into_bytes()).collect();
    std::fs::write(served.join("data.bin"), &data).unwrap();
    std::fs::write(served.join("corpus.jsonl"), &corpus).unwrap();
    let (data_digest, corpus_digest) =
        (format!("{:x}", Sha256::digest(&data)), format!("{:x}", Sha256::digest(&corpus)));
    let in_cache = |i: usize, digest: &str, name: &str| {
        let path = cluster.dir.path().join(format!("node{i}/cache/sha256/{digest}/{name}"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let log = |i: usize| std::fs::read_to_string(cluster.dir.path().join(format!("node{i}.log"))).unwrap_or_default();

    let yaml = format!(
        "name: file\nkind: command\nnodes: 3\ngpus_per_node: 1\nstop_grace: 1s\nnode_selector: {{grp: a}}\n\
         stage: [{{name: data, source: {}, sha256: {data_digest}}}]\ncommand: ['true']\n",
        served.join("data.bin").display()
    );
    let first = run(&cluster, &yaml).await;
    let fetchers: Vec<&StageStatus> = first.staging.iter().filter(|s| s.bytes_from_peers > 0).collect();
    assert_eq!(fetchers.len(), 2, "one node reads the file: {:?}", first.staging);
    for s in &fetchers {
        assert_eq!(s.bytes_from_peers, data.len() as u64, "{s:?}");
        let i: usize = s.node_name.trim_start_matches("node").parse().unwrap();
        assert!(in_cache(i, &data_digest, "data.bin") == data, "node{i}");
        let log = log(i);
        let line = log.lines().rfind(|l| l.contains("fetched from peers")).unwrap_or_else(|| panic!("node{i}: {log}"));
        assert!(line.contains("pieces=4"), "3.5 MiB in pieces of 1 MiB: {line}");
    }

    let http = HttpSource::start(&served, cluster.dir.path().join("http.log"), 0);
    let yaml = format!(
        "name: url\nkind: command\nnodes: 4\ngpus_per_node: 1\nstop_grace: 1s\n\
         stage: [{{name: corpus, source: 'http://127.0.0.1:{}/corpus.jsonl'}}]\ncommand: ['true']\n",
        http.port
    );
    let second = run(&cluster, &yaml).await;
    let getters = http.getters("/corpus.jsonl");
    assert_eq!(getters.len(), 1, "the source is read once: {getters:?}");
    let readers: Vec<&StageStatus> = second.staging.iter().filter(|s| s.bytes_from_peers == 0).collect();
    assert_eq!(readers.len(), 1, "{:?}", second.staging);
    for s in &second.staging {
        assert!(s.path.ends_with(&format!("/{corpus_digest}/corpus.jsonl")), "the URL's content: {s:?}");
        assert_eq!(s.sha256, corpus_digest, "the digest in the job's record: {s:?}");
        if s.node_name != readers[0].node_name {
            assert_eq!(s.bytes_from_peers, corpus.len() as u64, "{s:?}");
        }
        let i: usize = s.node_name.trim_start_matches("node").parse().unwrap();
        assert!(in_cache(i, &corpus_digest, "corpus.jsonl") == corpus, "node{i}");
    }
}

/// A URL that takes longer to download (64 MiB at 8 MiB/s) than a fetching
/// node waits without progress (`--peer-stall 5s`): the node reading it
/// tells its peer how far it got (every 16 MiB, at most every 2 s), so the
/// peer waits for the whole file and fetches it from it, rather than giving
/// up and downloading the URL too (one GET in the server's log).
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_waits_for_a_slow_download_it_hears_progress_from() {
    let mut specs = nodes(2);
    for spec in &mut specs {
        spec.extra_args.extend(["--peer-stall".to_owned(), "5s".to_owned()]);
    }
    let cluster = Cluster::start(specs).await.unwrap();
    let served = cluster.dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(served.join("weights.bin"), &data).unwrap();
    let digest = format!("{:x}", Sha256::digest(&data));
    let http = HttpSource::start(&served, cluster.dir.path().join("http.log"), 8 << 20);
    let yaml = format!(
        "name: slow\nkind: command\nnodes: 2\ngpus_per_node: 1\nstop_grace: 1s\n\
         stage: [{{name: weights, source: 'http://127.0.0.1:{}/weights.bin', sha256: {digest}}}]\ncommand: ['true']\n",
        http.port
    );
    let done = run(&cluster, &yaml).await;
    let getters = http.getters("/weights.bin");
    assert_eq!(getters.len(), 1, "the source is read once: {getters:?}; {:?}", done.staging);
    let fetcher = done.staging.iter().find(|s| s.bytes_from_peers > 0).expect("one node fetched from its peer");
    assert_eq!(fetcher.bytes_from_peers, data.len() as u64, "{fetcher:?}");
}
