//! Peer-to-peer staging (issue 18): nodes fetch an input (a directory, a
//! file or a URL) from each other instead of every node reading the source.
//!
//! The controller names, in each `StageInput`, the nodes that hold the
//! content or are staging it now (`peers`); the nodes it leaves without peers
//! read the source (as many as `--max-source-pulls` allows at once). Every
//! agent serves what it holds on its peer service ([`PeerServer`], on
//! `NodeInfo.peer_port`, mutual TLS with node certificates): which files of a
//! content it has, as each is done (`WatchContent`), and the files themselves
//! (`FetchPiece`), at most [`UPLOAD_SLOTS`] at once. A node staging from the
//! source offers each file as soon as it is copied and hashed, so its peers
//! fetch while it still reads; a node fetching from peers offers each file
//! once it verified it. So the content flows down from the source once and
//! spreads between the nodes, file by file (the piece each node asks for
//! next: [`cohort_shared::swarm::choose`], rarest first).
//!
//! An input without a digest is read by one node of the attempt; the
//! controller tells the others (`StageInput.awaits_digest`) to wait for the
//! digest it finds (`StageDigestCommand`, see `crate::prepare`), then they
//! fetch it as above from that node, which holds it complete by then.
//!
//! Verification: a file is checked against the digest the serving peer
//! announced for it before it is kept (and so before it is served on); the
//! directory is complete only when a manifest whose SHA-256 is the declared
//! digest lists exactly the files held, each with the digest it was checked
//! against. Content that is one file (a staged file or URL, whose digest is
//! the file's own) travels as a manifest of that file alone
//! ([`crate::stage::ManifestOf`]); it is offered once complete, with the
//! bytes read from the source so far told meanwhile
//! (`ContentHave.source_bytes`). A peer that serves a file whose bytes do
//! not match is reported (`StagedInput.corrupt_peers`) and not asked
//! again; a peer that dies mid-file costs that file, fetched again from
//! another. When no peer can
//! serve the content (all gone; the only ones left fetch from peers too,
//! `ContentHave.fetching`, and hold nothing more that is needed; or nothing
//! offered for [`STALL`]), the agent reads the source after all.
//!
//! Files are read and written only as the job's user, through the
//! `files-as` helper ([`AsJobUser::read_content`],
//! [`AsJobUser::receive_file`], [`AsJobUser::finish_tree`]): the agent only
//! moves bytes between the network and that helper. A content is served for
//! the user the request names, from that user's cache; any node of the
//! cluster may ask (nodes run every user's jobs).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::peer_service_client::PeerServiceClient;
use cohort_proto::peer_service_server::{PeerService, PeerServiceServer};
use cohort_proto::{ContentFile, ContentHave, ContentPeer, ContentRequest, PieceChunk, PieceRequest};
use cohort_runtime::tls::ClientTls;
use cohort_runtime::tls::pki::{PeerKind, identity_of};
use cohort_shared::swarm::{self, Mine, PeerView, UPLOAD_SLOTS};
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OnceCell, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::job_files::content::{MAX_MODES, PathMode};
use crate::job_files::{AsJobUser, BodyStream, FileAt, PieceOf, Received, Span, is_sha256_hex, user_cache};
use crate::rank_user::{RankIdentity, RankUserPolicy};

/// A fetch from peers gives up (and the source is read) after this long
/// without a file arriving or any peer offering one (the agent's
/// `--peer-stall`, this by default).
pub const STALL: Duration = Duration::from_secs(60);
/// A peer that refused a request (it serves [`UPLOAD_SLOTS`] already) is not
/// asked again for this long.
const BUSY_PAUSE: Duration = Duration::from_millis(100);
/// A peer whose transfer broke is not asked again for this long.
const FAILED_PAUSE: Duration = Duration::from_secs(1);
/// A piece a super-seeding peer refused (it sent it once already and still
/// has pieces nobody has) is asked of it again after this long: the node it
/// went to may have died before passing it on, and once the seed has sent
/// every piece once it serves any again.
const REFUSED_PAUSE: Duration = Duration::from_secs(5);
/// How often a node reading content from its source tells a peer watching
/// it how far it got ([`Announcer::read`]), at most.
const SOURCE_BYTES_EVERY: Duration = Duration::from_secs(2);
/// Bytes per `PieceChunk`.
const CHUNK: usize = 256 << 10;
/// The largest manifest taken from a peer.
const MAX_MANIFEST: usize = 256 << 20;
/// Files whose piece digests a node computes at once, for a peer asking
/// about complete content.
const DESCRIBE_PARALLEL: usize = 4;

/// Where a content this node stages stands, for its peers.
#[derive(Debug, Clone, Default)]
pub struct Have {
    /// Files (or pieces of files) done so far, in the order they were done.
    pub files: Vec<ContentFile>,
    pub state: HaveState,
    /// Fetched from peers here, not read from the source.
    pub fetching: bool,
    /// Bytes read from the source so far (see [`Announcer::read`]).
    pub source_bytes: u64,
}

impl Have {
    /// Whether the piece `piece` of `path` cut in `piece_bytes` (0: the
    /// whole file) was announced.
    fn holds(&self, path: &str, piece_bytes: u64, piece: u32) -> bool {
        self.files.iter().any(|f| {
            f.path == path && (f.pieces.is_empty() || (f.piece_bytes == piece_bytes && f.pieces.contains(&piece)))
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HaveState {
    #[default]
    Staging,
    /// In the cache, with its manifest.
    Complete,
    Failed,
}

/// One user's cache and a content digest.
type Key = (PathBuf, String);

/// A complete content's large files with their piece digests, once hashed.
type Described = Arc<OnceCell<Arc<Vec<ContentFile>>>>;

/// The node's side of peer-to-peer staging: what it stages now (served to
/// peers while under way) and how it reaches other nodes.
pub struct Peers {
    node: String,
    /// None: plaintext (an agent started with --insecure).
    tls: Option<ClientTls>,
    helper: PathBuf,
    cache_root: PathBuf,
    rank_users: RankUserPolicy,
    /// Files larger than this travel in pieces of this size.
    piece_bytes: u64,
    /// A fetch without progress this long gives up ([`STALL`] by default).
    stall: Duration,
    staging: Mutex<HashMap<Key, watch::Sender<Have>>>,
    /// Content this node read from its source: which of its pieces it sent
    /// once already (see [`Seeding`]).
    seeding: Mutex<HashMap<Key, Seeding>>,
    /// Complete content's large files with their piece digests, computed
    /// once (by the first peer's question) and kept: content does not change.
    described: Mutex<HashMap<Key, Described>>,
    uploads: Arc<Semaphore>,
}

/// Super-seeding (as BitTorrent's initial seeder): a node that read the
/// content from its source sends each piece once before it sends any piece
/// a second time, so its upload, the only way the content enters the swarm,
/// never carries the same piece twice while pieces nobody has wait; a
/// request for a piece it sent already is refused (FAILED_PRECONDITION) and
/// the requester fetches it from a node it went to. In `cohort-fanout`'s
/// model this takes 8 nodes from 1.47x to 1.16x one node's time (see
/// benchmarks.md).
#[derive(Debug, Default)]
struct Seeding {
    offered: HashSet<String>,
    sent: HashSet<String>,
}

impl Seeding {
    /// Whether a request for the piece `key` is served (and then counts as sent).
    fn serve(&mut self, key: &str) -> bool {
        if self.sent.contains(key) && self.offered.iter().any(|p| !self.sent.contains(p)) {
            return false;
        }
        self.sent.insert(key.to_owned());
        true
    }

    fn over(&self) -> bool {
        self.offered.iter().all(|p| self.sent.contains(p))
    }
}

/// A piece's name in [`Seeding`]: the file's path, and the piece's index
/// when the file travels in pieces.
fn piece_key(path: &str, piece_bytes: u64, piece: u32) -> String {
    if piece_bytes == 0 { path.to_owned() } else { format!("{path}\0{piece}") }
}

/// How many pieces of `piece_bytes` a file of `size` bytes travels in; 0
/// when it travels whole (no piece size, or not larger than one piece).
/// The [`piece_key`]s of a file of `size` bytes cut in pieces of
/// `piece_bytes` (one, the whole file, when it travels whole).
fn piece_keys(path: &str, size: u64, piece_bytes: u64) -> Vec<String> {
    match piece_count(size, piece_bytes) {
        0 => vec![path.to_owned()],
        count => (0..count).map(|i| piece_key(path, piece_bytes, i as u32)).collect(),
    }
}

fn piece_count(size: u64, piece_bytes: u64) -> usize {
    if piece_bytes == 0 || size <= piece_bytes {
        0
    } else {
        usize::try_from(size.div_ceil(piece_bytes)).unwrap_or(usize::MAX)
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("node", &self.node).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Tells peers of the files (and pieces) of a content staged here as each
/// is done; cloned into the tasks that hash a large file's pieces.
#[derive(Clone)]
pub struct Announcer {
    peers: Arc<Peers>,
    key: Key,
    tx: watch::Sender<Have>,
    /// Read from the source here: super-seeded ([`Seeding`]).
    seed: bool,
}

impl Announcer {
    /// A file done (copied or fetched, and verified), or pieces of it.
    pub fn file(&self, file: ContentFile) {
        if self.seed {
            let mut seeding = lock(&self.peers.seeding);
            let offered = &mut seeding.entry(self.key.clone()).or_default().offered;
            offered.extend(piece_keys(&file.path, file.size, file.piece_bytes));
        }
        self.tx.send_modify(|have| have.files.push(file));
    }

    /// `bytes` of the content read from the source so far: peers waiting
    /// for a file this node offers only once it is complete (a single large
    /// file) hear that it is still coming, not silence.
    pub fn read(&self, bytes: u64) {
        self.tx.send_if_modified(|have| {
            let grew = bytes > have.source_bytes;
            have.source_bytes = have.source_bytes.max(bytes);
            grew
        });
    }

    /// The size large files travel in between nodes.
    pub fn piece_bytes(&self) -> u64 {
        self.peers.piece_bytes
    }
}

/// Content announced as being staged here; its peers see each file added.
/// Dropped before [`Announced::complete`]: the staging failed.
pub struct Announced {
    announcer: Announcer,
    complete: bool,
}

impl Announced {
    /// A file done (copied or fetched, and verified), or pieces of it.
    pub fn file(&self, file: ContentFile) {
        self.announcer.file(file);
    }

    /// A handle that announces files too, for tasks that outlive a borrow.
    pub fn announcer(&self) -> Announcer {
        self.announcer.clone()
    }

    /// The content is in the cache with its manifest.
    pub fn complete(mut self) {
        self.complete = true;
    }
}

impl Drop for Announced {
    fn drop(&mut self) {
        let Announcer { peers, key, tx, .. } = &self.announcer;
        let state = if self.complete { HaveState::Complete } else { HaveState::Failed };
        tx.send_modify(|have| have.state = state);
        let mut staging = lock(&peers.staging);
        if staging.get(key).is_some_and(|t| t.same_channel(tx)) {
            staging.remove(key);
        }
        drop(staging);
        if !self.complete {
            lock(&peers.seeding).remove(key);
        }
    }
}

/// What a fetch from peers got.
#[derive(Debug, Default)]
pub struct Fetched {
    pub bytes: u64,
    /// Pieces of files that travel in pieces, among what came.
    pub pieces: u32,
    /// Peers that served a file whose digest did not match.
    pub corrupt_peers: Vec<String>,
}

/// A download's end, or a file's completion from its pieces.
enum Ended {
    Piece(usize, usize, Result<Received, Status>),
    File(usize, Result<Received, String>),
}

impl Peers {
    pub fn new(
        node: String,
        tls: Option<ClientTls>,
        helper: PathBuf,
        cache_root: PathBuf,
        rank_users: RankUserPolicy,
        piece_bytes: u64,
        stall: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            tls,
            helper,
            cache_root,
            rank_users,
            piece_bytes: piece_bytes.max(1),
            stall,
            staging: Mutex::default(),
            seeding: Mutex::default(),
            described: Mutex::default(),
            uploads: Arc::new(Semaphore::new(UPLOAD_SLOTS as usize)),
        })
    }

    /// Content `digest` was just read from its source into `cache` whole,
    /// before any peer could be told its digest (an input without one):
    /// this node super-seeds it as it would have while staging ([`Seeding`]),
    /// each of its files and large files' pieces sent once before any is
    /// sent twice. Nothing is recorded for content with symlinks (peers do
    /// not fetch it) or whose manifest cannot be read.
    pub async fn seed_complete(&self, user: AsJobUser<'_>, cache: &Path, digest: &str) {
        let manifest = match read_manifest(user, cache, digest).await {
            Ok(Some(manifest)) => manifest,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(content = %digest, error = %e, "cannot read the manifest to seed it");
                return;
            }
        };
        let Ok(parsed) = crate::stage::parse_manifest(&manifest) else { return };
        if parsed.links > 0 {
            return;
        }
        let mut offered = HashSet::new();
        for file in &parsed.files {
            let Some(path) = file.path.to_str() else { return };
            offered.extend(piece_keys(path, file.size, self.piece_bytes));
        }
        let key = (cache.to_owned(), digest.to_owned());
        lock(&self.seeding).insert(key, Seeding { offered, sent: HashSet::new() });
    }

    /// What this node super-seeds of content `digest` in `cache` and has not
    /// sent yet, sorted (piece names as [`piece_key`] makes them).
    #[cfg(test)]
    pub(crate) fn unsent_seeds(&self, cache: &Path, digest: &str) -> Option<Vec<String>> {
        let seeding = lock(&self.seeding);
        let seed = seeding.get(&(cache.to_owned(), digest.to_owned()))?;
        let mut unsent: Vec<String> = seed.offered.difference(&seed.sent).cloned().collect();
        unsent.sort();
        Some(unsent)
    }

    /// Announces that this node stages `digest` into `cache` now, from its
    /// source; None when it already does (in another job's preparation).
    pub fn announce(self: &Arc<Self>, cache: &Path, digest: &str) -> Option<Announced> {
        self.announce_as(cache, digest, true)
    }

    /// [`Self::announce`] for content fetched from peers.
    fn announce_fetch(self: &Arc<Self>, cache: &Path, digest: &str) -> Option<Announced> {
        self.announce_as(cache, digest, false)
    }

    fn announce_as(self: &Arc<Self>, cache: &Path, digest: &str, seed: bool) -> Option<Announced> {
        let key = (cache.to_owned(), digest.to_owned());
        let mut staging = lock(&self.staging);
        if staging.contains_key(&key) {
            return None;
        }
        let (tx, _) = watch::channel(Have { fetching: !seed, ..Have::default() });
        staging.insert(key.clone(), tx.clone());
        Some(Announced { announcer: Announcer { peers: self.clone(), key, tx, seed }, complete: false })
    }

    fn watch(&self, cache: &Path, digest: &str) -> Option<watch::Receiver<Have>> {
        lock(&self.staging).get(&(cache.to_owned(), digest.to_owned())).map(watch::Sender::subscribe)
    }

    /// The peer service, to add to this agent's gRPC server.
    pub fn server(self: &Arc<Self>) -> PeerServiceServer<PeerServer> {
        PeerServiceServer::new(PeerServer { peers: self.clone() })
    }

    async fn client(&self, peer: &ContentPeer) -> Result<PeerServiceClient<Channel>, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{}", peer.address))
            .map_err(|e| format!("peer {} at {:?}: {e}", peer.node_name, peer.address))?
            .connect_timeout(Duration::from_secs(5))
            // A peer that stops answering (a hung host) breaks its transfers
            // within seconds rather than stalling them.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let endpoint = match &self.tls {
            Some(tls) => tls.peer(endpoint, &peer.node_name).map_err(|e| format!("peer {}: {e}", peer.node_name))?,
            None => endpoint,
        };
        Ok(PeerServiceClient::new(endpoint.connect_lazy()))
    }

    /// Fetches directory content `digest` from `peers` into `cache` (the
    /// job user's cache), as `user`, verifying every piece and every file;
    /// `user_name` is the job's `user:` the peers look the content up
    /// under; `progress` is told the bytes and files fetched so far after
    /// each piece. Err: the peers could not serve it (the caller reads the
    /// source).
    pub async fn fetch(
        self: &Arc<Self>,
        user_name: &str,
        user: AsJobUser<'_>,
        cache: &Path,
        digest: &str,
        peers: &[ContentPeer],
        progress: &(dyn Fn(u64, u32) + Sync),
    ) -> Result<Fetched, String> {
        let Some(announced) = self.announce_fetch(cache, digest) else {
            // Fetched or staged here for another job right now: wait for it.
            let Some(mut rx) = self.watch(cache, digest) else { return Ok(Fetched::default()) };
            let done = rx.wait_for(|h| h.state != HaveState::Staging).await.map(|h| h.state);
            return match done {
                Ok(HaveState::Complete) | Err(_) => Ok(Fetched::default()),
                Ok(_) => Err("staging the same content for another job failed here".into()),
            };
        };
        let mut clients = Vec::new();
        for peer in peers.iter().filter(|p| p.node_name != self.node) {
            match self.client(peer).await {
                Ok(client) => clients.push((peer.node_name.clone(), client)),
                Err(e) => tracing::warn!(error = %e, "peer left out"),
            }
        }
        if clients.is_empty() {
            return Err("no peer to fetch from".into());
        }
        let mut swarm = Swarm::new(digest, clients.iter().map(|(n, _)| n.clone()).collect());
        let (events_tx, mut events) = mpsc::channel(256);
        let watchers: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(index, (_, client))| {
                let request = ContentRequest { user: user_name.to_owned(), sha256: digest.to_owned() };
                tokio::spawn(watch_peer(index, client.clone(), request, events_tx.clone(), self.stall))
            })
            .collect();
        drop(events_tx);
        let _stop_watchers: Vec<AbortOnDrop<()>> = watchers.into_iter().map(AbortOnDrop).collect();
        let mut downloads = FuturesUnordered::new();
        let mut last_progress = Instant::now();
        let mut watching = true;
        let limits = swarm::Limits::DEFAULT;
        let mut random = {
            let mut state = u64::from_le_bytes(Sha256::digest(self.node.as_bytes())[..8].try_into().unwrap_or([1; 8]));
            move || {
                // xorshift64*: spreads the choices of the nodes, seeded by their names.
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                state.wrapping_mul(0x2545_f491_4f6c_dd1d)
            }
        };
        loop {
            if let Some(manifest) = swarm.done() {
                user.finish_tree(cache, digest, &manifest, &swarm.modes).await.map_err(|e| e.to_string())?;
                announced.complete();
                return Ok(swarm.fetched);
            }
            let now = Instant::now();
            swarm.unrefuse(now);
            while let Some((piece, peer)) = swarm.choose(now, limits, &mut random) {
                let wanted = swarm.start(piece, peer);
                let request = PieceRequest {
                    user: user_name.to_owned(),
                    sha256: digest.to_owned(),
                    path: wanted.path.clone(),
                    piece_bytes: wanted.piece_bytes,
                    piece: wanted.index,
                };
                let mut client = clients[peer].1.clone();
                downloads.push(
                    async move {
                        let result = async {
                            let response = client.fetch_piece(request).await?;
                            let body: BodyStream = Box::pin(
                                response
                                    .into_inner()
                                    .map(|chunk| chunk.map(|c| c.data).map_err(|s| s.message().to_owned())),
                            );
                            let Wanted { path, size, sha256, piece, .. } = wanted;
                            user.receive_file(cache, digest, Path::new(&path), size, &sha256, piece, body)
                                .await
                                .map_err(|e| Status::internal(e.to_string()))
                        }
                        .await;
                        Ended::Piece(piece, peer, result)
                    }
                    .boxed(),
                );
            }
            if let Some(why) = &swarm.broken {
                return Err(why.clone());
            }
            if downloads.is_empty() && (swarm.hopeless() || !watching) {
                return Err(format!("no peer could serve it ({})", swarm.why()));
            }
            let wake = swarm.next_unpause().unwrap_or_else(|| now + self.stall);
            tokio::select! {
                Some(ended) = downloads.next(), if !downloads.is_empty() => {
                    let gained = match ended {
                        Ended::Piece(piece, peer, result) => {
                            let step = swarm.finished(piece, peer, result, &announced);
                            if let Some(file) = step.finish {
                                let completion = swarm.completion(cache, digest, file);
                                downloads.push(
                                    async move {
                                        let result = user
                                            .finish_file(completion)
                                            .await
                                            .map_err(|e| e.to_string());
                                        Ended::File(file, result)
                                    }
                                    .boxed(),
                                );
                            }
                            step.gained
                        }
                        Ended::File(file, result) => swarm.file_finished(file, result, &announced),
                    };
                    if gained {
                        last_progress = Instant::now();
                        progress(swarm.fetched.bytes, swarm.files_done());
                    }
                }
                event = events.recv(), if watching => {
                    match event {
                        Some(event) => {
                            if swarm.event(event) {
                                last_progress = Instant::now();
                            }
                        }
                        // Every peer's watch ended: what is in flight finishes, nothing new is offered.
                        None => watching = false,
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            if last_progress.elapsed() > self.stall {
                let waited = humantime::format_duration(self.stall);
                return Err(format!("nothing came from any peer for {waited} ({})", swarm.why()));
            }
        }
    }

    /// The large files of complete content `digest` with their piece
    /// digests (each read once, as the user), for a peer about to fetch it.
    async fn describe(
        &self,
        user: AsJobUser<'_>,
        cache: &Path,
        digest: &str,
        manifest: &[u8],
    ) -> Arc<Vec<ContentFile>> {
        let cell = lock(&self.described).entry((cache.to_owned(), digest.to_owned())).or_default().clone();
        cell.get_or_init(|| async {
            let Ok(parsed) = crate::stage::parse_manifest(manifest) else { return Arc::new(Vec::new()) };
            let piece_bytes = self.piece_bytes;
            let large = parsed.files.into_iter().filter(|f| piece_count(f.size, piece_bytes) > 0);
            let described: Vec<ContentFile> = futures::stream::iter(large)
                .map(|entry| async move {
                    let path = entry.path.to_str()?.to_owned();
                    let digests = user.piece_digests(cache, digest, &entry.path, piece_bytes, &entry.sha256).await;
                    match digests {
                        Ok(Some(digests)) if digests.len() == piece_count(entry.size, piece_bytes) => {
                            Some(ContentFile {
                                path,
                                size: entry.size,
                                sha256: entry.sha256,
                                piece_bytes,
                                piece_sha256: digests,
                                pieces: Vec::new(),
                            })
                        }
                        Ok(_) => None,
                        Err(e) => {
                            tracing::warn!(file = %path, error = %e, "cannot hash a file's pieces; peers fetch it whole");
                            None
                        }
                    }
                })
                .buffer_unordered(DESCRIBE_PARALLEL)
                .filter_map(std::future::ready)
                .collect()
                .await;
            Arc::new(described)
        })
        .await
        .clone()
    }
}

/// Awaits `described` (a single file's pieces hashed once it is complete:
/// 16 GB off a slow disk takes over a minute) while telling the watching
/// peer every [`SOURCE_BYTES_EVERY`] that it goes on, as it heard the source
/// read: `source_bytes` one more than `told` each time. None: the peer left.
async fn telling_meanwhile(
    described: impl std::future::Future<Output = Arc<Vec<ContentFile>>>,
    tx: &mpsc::Sender<Result<ContentHave, Status>>,
    mut told: u64,
) -> Option<Vec<ContentFile>> {
    tokio::pin!(described);
    let mut tick = tokio::time::interval(SOURCE_BYTES_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            files = &mut described => return Some(files.to_vec()),
            _ = tick.tick() => {
                told += 1;
                tx.send(Ok(ContentHave { source_bytes: told, ..ContentHave::default() })).await.ok()?;
            }
        }
    }
}

/// Aborts its task when dropped.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a peer's `WatchContent` stream told.
#[derive(Debug)]
enum PeerEvent {
    Files(usize, Vec<ContentFile>),
    /// The peer fetches the content from peers too: it brings nothing new
    /// once the others are gone.
    Fetching(usize),
    /// The manifest of complete content, with the modes of its paths.
    Manifest(usize, Vec<u8>, Vec<PathMode>),
    /// The peer has read this many bytes of the content from its source so
    /// far: a large file it offers once it is complete is still coming.
    Reading(usize, u64),
    /// The peer cannot serve (it never had the content, failed, or is unreachable).
    Gone(usize, String),
}

/// Follows one peer's `WatchContent` until it ends; a peer that does not
/// stage the content yet (its own preparation may start later than ours) is
/// asked again, for up to `stall`.
async fn watch_peer(
    index: usize,
    mut client: PeerServiceClient<Channel>,
    request: ContentRequest,
    events: mpsc::Sender<PeerEvent>,
    stall: Duration,
) {
    let deadline = Instant::now() + stall;
    let mut pause = Duration::from_millis(50);
    let why = loop {
        match client.watch_content(request.clone()).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(have)) => {
                            if have.fetching && events.send(PeerEvent::Fetching(index)).await.is_err() {
                                return;
                            }
                            if have.source_bytes > 0
                                && events.send(PeerEvent::Reading(index, have.source_bytes)).await.is_err()
                            {
                                return;
                            }
                            if !have.files.is_empty() && events.send(PeerEvent::Files(index, have.files)).await.is_err()
                            {
                                return;
                            }
                            if !have.manifest.is_empty() {
                                let modes = have
                                    .modes
                                    .into_iter()
                                    .take(MAX_MODES)
                                    .map(|m| PathMode { path: m.path, mode: m.mode })
                                    .collect();
                                let _ = events.send(PeerEvent::Manifest(index, have.manifest, modes)).await;
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            let _ = events.send(PeerEvent::Gone(index, status.message().to_owned())).await;
                            return;
                        }
                    }
                }
                break "its stream ended before the content was complete".to_owned();
            }
            Err(status) if Instant::now() + pause < deadline => {
                tracing::debug!(code = ?status.code(), message = status.message(), "peer has nothing yet; asking again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(status) => break status.message().to_owned(),
        }
    };
    let _ = events.send(PeerEvent::Gone(index, why)).await;
}

/// One piece of the content: a whole file, or `len` bytes of one from `offset`.
struct Piece {
    file: usize,
    /// Its index in the file (0 for a file that travels whole).
    index: u32,
    offset: u64,
    len: u64,
    /// The piece's digest (the file's own for a file that travels whole).
    sha256: String,
    mine: Mine,
    /// Of a cut of its file given up (its digests were wrong): never fetched.
    dropped: bool,
}

/// One file of the content.
struct FileEntry {
    path: String,
    size: u64,
    sha256: String,
    /// The piece size it travels in; 0: whole.
    piece_bytes: u64,
    piece_sha256: Vec<String>,
    /// Its pieces, as indices into [`Swarm::pieces`].
    pieces: std::ops::Range<usize>,
    /// Listed by the manifest (or, before it came, announced by a peer).
    needed: bool,
    /// Here, checked whole.
    done: bool,
    /// Which peer gave its piece digests (blamed if they were wrong).
    described_by: Option<usize>,
    /// Its piece digests were sent to this node's own peers.
    described: bool,
    /// Times completing it from its pieces failed here (not for its bytes).
    failures: u32,
}

impl FileEntry {
    fn travels_whole(&self) -> bool {
        self.piece_bytes == 0
    }
}

/// What a download is for.
struct Wanted {
    path: String,
    size: u64,
    /// The file's digest.
    sha256: String,
    piece_bytes: u64,
    index: u32,
    /// Where the piece goes and its digest; None: the whole file.
    piece: Option<PieceOf>,
}

/// What a finished download did.
struct Step {
    /// A piece (and so bytes) gained.
    gained: bool,
    /// Every piece of this file is here: complete it.
    finish: Option<usize>,
}

struct PeerState {
    name: String,
    has: Vec<bool>,
    in_flight: u32,
    paused_until: Option<Instant>,
    gone: Option<String>,
    corrupt: bool,
    /// It fetches from peers too (it said so): what it may still offer is
    /// only what it gets from the others.
    fetching: bool,
    /// Pieces it holds but refused as a super-seeding node, each counted as
    /// held again at its instant ([`REFUSED_PAUSE`]).
    refused: Vec<(usize, Instant)>,
    /// The bytes it said it read from its source so far.
    source_bytes: u64,
}

/// The fetching node's view of the content and of its peers.
struct Swarm {
    digest: String,
    files: Vec<FileEntry>,
    pieces: Vec<Piece>,
    index: HashMap<String, usize>,
    peers: Vec<PeerState>,
    manifest: Option<String>,
    /// The modes of the content's paths, from the peer whose manifest was taken.
    modes: Vec<PathMode>,
    fetched: Fetched,
    /// Fetching cannot go on here (a file cannot be completed from its
    /// pieces, again and again): the source is read instead.
    broken: Option<String>,
}

/// Completing a file from its pieces may fail this often (its pieces
/// fetched again each time) before the fetch gives up.
const FINISH_TRIES: u32 = 3;

impl Swarm {
    fn new(digest: &str, peers: Vec<String>) -> Self {
        Self {
            digest: digest.to_owned(),
            files: Vec::new(),
            pieces: Vec::new(),
            index: HashMap::new(),
            peers: peers
                .into_iter()
                .map(|name| PeerState {
                    name,
                    has: Vec::new(),
                    in_flight: 0,
                    paused_until: None,
                    gone: None,
                    corrupt: false,
                    fetching: false,
                    refused: Vec::new(),
                    source_bytes: 0,
                })
                .collect(),
            manifest: None,
            modes: Vec::new(),
            fetched: Fetched::default(),
            broken: None,
        }
    }

    /// The manifest, once it is known and every file it lists is here.
    fn done(&self) -> Option<String> {
        let manifest = self.manifest.as_ref()?;
        self.files.iter().all(|f| !f.needed || f.done).then(|| manifest.clone())
    }

    fn files_done(&self) -> u32 {
        u32::try_from(self.files.iter().filter(|f| f.needed && f.done).count()).unwrap_or(u32::MAX)
    }

    fn usable(&self, peer: &PeerState, now: Instant) -> bool {
        peer.gone.is_none() && !peer.corrupt && peer.paused_until.is_none_or(|t| t <= now)
    }

    fn choose(&self, now: Instant, limits: swarm::Limits, random: &mut impl FnMut() -> u64) -> Option<(usize, usize)> {
        let mine: Vec<Mine> =
            self.pieces.iter().map(|p| if self.still_needed(p) { p.mine } else { Mine::Have }).collect();
        let views: Vec<PeerView<'_>> = self
            .peers
            .iter()
            .map(|p| PeerView { has: &p.has, in_flight: p.in_flight, usable: self.usable(p, now) })
            .collect();
        swarm::choose(&mine, &views, limits, random)
    }

    fn start(&mut self, piece: usize, peer: usize) -> Wanted {
        self.pieces[piece].mine = Mine::InFlight;
        self.peers[peer].in_flight += 1;
        let p = &self.pieces[piece];
        let file = &self.files[p.file];
        Wanted {
            path: file.path.clone(),
            size: file.size,
            sha256: file.sha256.clone(),
            piece_bytes: file.piece_bytes,
            index: p.index,
            piece: (!file.travels_whole())
                .then(|| PieceOf { span: Span { offset: p.offset, len: p.len }, sha256: p.sha256.clone() }),
        }
    }

    /// The file `file`, to complete from its pieces: path, size, digest.
    /// Where `file`, complete from its pieces, goes: its pieces' digests kept with it.
    fn completion(&self, cache: &Path, digest: &str, file: usize) -> FileAt {
        let f = &self.files[file];
        FileAt::new(cache, digest, Path::new(&f.path), f.size, &f.sha256)
            .with_pieces(f.piece_bytes, f.piece_sha256.clone())
    }

    /// What this node tells its own peers of `file`: the whole of it
    /// (`piece` None) or one piece; the piece digests with the first word.
    fn announcement(&mut self, file: usize, piece: Option<u32>) -> ContentFile {
        let f = &mut self.files[file];
        let piece_sha256 = if f.described || f.travels_whole() { Vec::new() } else { f.piece_sha256.clone() };
        f.described = true;
        ContentFile {
            path: f.path.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
            piece_bytes: f.piece_bytes,
            piece_sha256,
            pieces: piece.into_iter().collect(),
        }
    }

    /// A download ended.
    fn finished(&mut self, piece: usize, peer: usize, result: Result<Received, Status>, announced: &Announced) -> Step {
        let state = &mut self.peers[peer];
        state.in_flight = state.in_flight.saturating_sub(1);
        let p = &mut self.pieces[piece];
        p.mine = Mine::Missing;
        let nothing = Step { gained: false, finish: None };
        let (file, index, len) = (p.file, p.index, p.len);
        let path = &self.files[file].path;
        match result {
            Ok(Received::Done) => {
                p.mine = Mine::Have;
                self.fetched.bytes += len;
                let f = &self.files[file];
                if f.travels_whole() {
                    self.files[file].done = true;
                    announced.file(self.announcement(file, None));
                    return Step { gained: true, finish: None };
                }
                self.fetched.pieces += 1;
                let complete = f.pieces.clone().all(|i| self.pieces[i].mine == Mine::Have);
                announced.file(self.announcement(file, Some(index)));
                return Step { gained: true, finish: complete.then_some(file) };
            }
            Ok(Received::Corrupt { actual }) => {
                tracing::warn!(peer = %state.name, file = %path, piece = index, expected = %p.sha256, %actual,
                    "a peer served bytes whose digest does not match; fetching them elsewhere and asking that peer no more");
                state.corrupt = true;
                self.fetched.corrupt_peers.push(state.name.clone());
            }
            Ok(Received::Short { got }) => {
                tracing::info!(peer = %state.name, file = %path, piece = index, got, len, "a peer's transfer broke off");
                state.paused_until = Some(Instant::now() + FAILED_PAUSE);
            }
            Err(status) => match status.code() {
                tonic::Code::ResourceExhausted => state.paused_until = Some(Instant::now() + BUSY_PAUSE),
                // Not here: from others.
                tonic::Code::NotFound => {
                    if let Some(has) = state.has.get_mut(piece) {
                        *has = false;
                    }
                }
                // Sent once already by a super-seeding node: from others for now.
                tonic::Code::FailedPrecondition => {
                    if let Some(has) = state.has.get_mut(piece) {
                        *has = false;
                        state.refused.push((piece, Instant::now() + REFUSED_PAUSE));
                    }
                }
                _ => {
                    tracing::info!(peer = %state.name, file = %path, piece = index, error = %status.message(), "fetching from a peer failed");
                    state.paused_until = Some(Instant::now() + FAILED_PAUSE);
                }
            },
        }
        nothing
    }

    /// A file completed from its pieces (checked whole), or not.
    fn file_finished(&mut self, file: usize, result: Result<Received, String>, announced: &Announced) -> bool {
        match result {
            Ok(Received::Done) => {
                self.files[file].done = true;
                announced.file(self.announcement(file, None));
                true
            }
            Ok(Received::Corrupt { actual }) => {
                // Every piece matched its digest, and the whole does not: the
                // digests were wrong. Their giver is not asked again, and the
                // file is fetched whole.
                let f = &self.files[file];
                tracing::warn!(file = %f.path, expected = %f.sha256, %actual,
                    "a file's pieces matched their digests but the file does not; fetching it whole");
                if let Some(peer) = f.described_by {
                    self.peers[peer].corrupt = true;
                    self.fetched.corrupt_peers.push(self.peers[peer].name.clone());
                }
                self.recut_whole(file);
                false
            }
            Ok(Received::Short { .. }) | Err(_) => {
                let why = match result {
                    Err(e) => e,
                    _ => "its pieces came short".to_owned(),
                };
                let f = &mut self.files[file];
                f.failures += 1;
                tracing::warn!(file = %f.path, error = %why, tries = f.failures, "completing a file from its pieces failed");
                if f.failures >= FINISH_TRIES {
                    self.broken = Some(format!("{} could not be completed from its pieces: {why}", f.path));
                }
                for i in self.files[file].pieces.clone() {
                    self.pieces[i].mine = Mine::Missing;
                }
                false
            }
        }
    }

    /// Takes in what a peer said; true if it offered something new.
    fn event(&mut self, event: PeerEvent) -> bool {
        match event {
            // Progress, if it read more than it had told (a stalled source is a stall).
            PeerEvent::Reading(peer, bytes) => {
                let state = &mut self.peers[peer];
                let more = bytes > state.source_bytes;
                state.source_bytes = state.source_bytes.max(bytes);
                more
            }
            PeerEvent::Files(peer, files) => {
                let mut new = false;
                for file in files {
                    new |= self.offered(peer, &file);
                }
                new
            }
            PeerEvent::Manifest(peer, manifest, modes) => {
                if manifest.len() > MAX_MANIFEST || crate::stage::ManifestOf::check(&manifest, &self.digest).is_none() {
                    let actual = format!("{:x}", Sha256::digest(&manifest));
                    tracing::warn!(peer = %self.peers[peer].name, %actual, "a peer sent a manifest of other content");
                    self.peers[peer].corrupt = true;
                    self.fetched.corrupt_peers.push(self.peers[peer].name.clone());
                    return false;
                }
                match self.take_manifest(manifest, modes) {
                    Ok(()) => {
                        // A complete peer holds every piece of every file listed, and nothing else.
                        for (i, piece) in self.pieces.iter().enumerate() {
                            self.peers[peer].has[i] = self.files[piece.file].needed && !piece.dropped;
                        }
                        true
                    }
                    Err(why) => {
                        for p in &mut self.peers {
                            p.gone.get_or_insert_with(|| why.clone());
                        }
                        false
                    }
                }
            }
            PeerEvent::Gone(peer, why) => {
                self.peers[peer].gone.get_or_insert(why);
                false
            }
            PeerEvent::Fetching(peer) => {
                self.peers[peer].fetching = true;
                false
            }
        }
    }

    /// Takes in that `peer` holds `file` (or pieces of it); true if new.
    /// Ignored when it contradicts what is known of that path, or cuts the
    /// file in other pieces than the ones known.
    fn offered(&mut self, peer: usize, file: &ContentFile) -> bool {
        let f = match self.index.get(&file.path) {
            Some(&f) => {
                let known = &self.files[f];
                if known.size != file.size || known.sha256 != file.sha256 {
                    return false;
                }
                f
            }
            // Not listed: nobody needs it.
            None if self.manifest.is_some() => return false,
            None => {
                let count = piece_count(file.size, file.piece_bytes);
                let cut = if count == 0 {
                    Some((0, Vec::new()))
                } else if file.piece_sha256.len() == count && file.piece_sha256.iter().all(|d| is_sha256_hex(d)) {
                    Some((file.piece_bytes, file.piece_sha256.clone()))
                } else {
                    None
                };
                // Pieces whose digests this node never got are of no use; a
                // whole file is (checked against the file's digest).
                let (piece_bytes, digests) = match cut {
                    Some(cut) => cut,
                    None if file.pieces.is_empty() => (0, Vec::new()),
                    None => return false,
                };
                self.add_file(file.path.clone(), file.size, file.sha256.clone(), piece_bytes, digests, Some(peer))
            }
        };
        let known = &self.files[f];
        let pieces: Vec<usize> = if file.pieces.is_empty() {
            known.pieces.clone().collect()
        } else if piece_count(file.size, file.piece_bytes) > 0 && file.piece_bytes == known.piece_bytes {
            file.pieces
                .iter()
                .filter_map(|&i| usize::try_from(i).ok())
                .filter(|&i| i < known.pieces.len())
                .map(|i| known.pieces.start + i)
                .collect()
        } else {
            return false;
        };
        let mut new = false;
        for i in pieces {
            if !self.pieces[i].dropped {
                new |= !self.peers[peer].has[i];
                self.peers[peer].has[i] = true;
            }
        }
        new
    }

    /// Adds a file (cut in `piece_bytes` pieces with `digests`, or whole
    /// with none); returns its index.
    fn add_file(
        &mut self,
        path: String,
        size: u64,
        sha256: String,
        piece_bytes: u64,
        digests: Vec<String>,
        described_by: Option<usize>,
    ) -> usize {
        let f = self.files.len();
        let pieces = self.cut(f, size, &sha256, piece_bytes, &digests);
        self.index.insert(path.clone(), f);
        self.files.push(FileEntry {
            path,
            size,
            sha256,
            piece_bytes,
            piece_sha256: digests,
            pieces,
            needed: true,
            done: false,
            described_by,
            described: false,
            failures: 0,
        });
        f
    }

    /// Adds the pieces of file `f`; returns their indices.
    fn cut(
        &mut self,
        f: usize,
        size: u64,
        sha256: &str,
        piece_bytes: u64,
        digests: &[String],
    ) -> std::ops::Range<usize> {
        let start = self.pieces.len();
        if piece_bytes == 0 {
            self.pieces.push(Piece {
                file: f,
                index: 0,
                offset: 0,
                len: size,
                sha256: sha256.to_owned(),
                mine: Mine::Missing,
                dropped: false,
            });
        } else {
            for (i, digest) in digests.iter().enumerate() {
                let offset = i as u64 * piece_bytes;
                self.pieces.push(Piece {
                    file: f,
                    index: i as u32,
                    offset,
                    len: piece_bytes.min(size - offset),
                    sha256: digest.clone(),
                    mine: Mine::Missing,
                    dropped: false,
                });
            }
        }
        for peer in &mut self.peers {
            peer.has.resize(self.pieces.len(), false);
        }
        start..self.pieces.len()
    }

    /// File `f` travels whole from now on: its pieces are dropped, and the
    /// peers that held all of them hold the whole.
    fn recut_whole(&mut self, f: usize) {
        let old = self.files[f].pieces.clone();
        let holders: Vec<bool> = self.peers.iter().map(|p| !old.is_empty() && old.clone().all(|i| p.has[i])).collect();
        for i in old {
            self.pieces[i].dropped = true;
            self.pieces[i].mine = Mine::Missing;
        }
        let (size, sha256) = (self.files[f].size, self.files[f].sha256.clone());
        let new = self.cut(f, size, &sha256, 0, &[]);
        for (peer, holds) in self.peers.iter_mut().zip(holders) {
            for i in new.clone() {
                peer.has[i] = holds;
            }
        }
        let file = &mut self.files[f];
        (file.piece_bytes, file.piece_sha256, file.pieces, file.done, file.described_by) =
            (0, Vec::new(), new, false, None);
    }

    /// The verified manifest: what is listed is needed, with the listed digest.
    fn take_manifest(&mut self, manifest: Vec<u8>, modes: Vec<PathMode>) -> Result<(), String> {
        if self.manifest.is_some() {
            return Ok(());
        }
        let parsed = crate::stage::parse_manifest(&manifest)?;
        if parsed.links > 0 {
            return Err("the directory holds symlinks, which peers do not serve".into());
        }
        let text = String::from_utf8(manifest).map_err(|_| "a file name is not UTF-8".to_owned())?;
        for file in &mut self.files {
            file.needed = false;
        }
        for entry in parsed.files {
            let Some(path) = entry.path.to_str().map(str::to_owned) else {
                return Err("a file name is not UTF-8".into());
            };
            match self.index.get(&path).copied() {
                Some(f) => {
                    self.files[f].needed = true;
                    let file = &self.files[f];
                    if file.size != entry.size || file.sha256 != entry.sha256 {
                        // Announced otherwise than the manifest lists it: fetched again, whole.
                        (self.files[f].size, self.files[f].sha256) = (entry.size, entry.sha256);
                        self.recut_whole(f);
                        for peer in &mut self.peers {
                            for i in self.files[f].pieces.clone() {
                                peer.has[i] = false;
                            }
                        }
                    }
                }
                None => {
                    self.add_file(path, entry.size, entry.sha256, 0, Vec::new(), None);
                }
            }
        }
        self.manifest = Some(text);
        self.modes = modes;
        Ok(())
    }

    /// No peer can serve anything any more.
    /// No peer can bring anything more: every one is gone, corrupt, or
    /// fetches from the others itself, and none of those holds a piece still
    /// needed here (what they may get later could only come from peers that
    /// are gone). Checked when no download is in flight.
    fn hopeless(&self) -> bool {
        let live = |p: &&PeerState| p.gone.is_none() && !p.corrupt;
        if self.peers.iter().filter(live).any(|p| !p.fetching) {
            return false;
        }
        let offered = |(i, piece): (usize, &Piece)| {
            self.still_needed(piece) && self.peers.iter().filter(live).any(|p| p.has.get(i) == Some(&true))
        };
        !self.pieces.iter().enumerate().any(offered)
    }

    /// A piece of a file still to be fetched: not of a cut given up, of a
    /// file the content lists and that is not complete here.
    fn still_needed(&self, piece: &Piece) -> bool {
        let file = &self.files[piece.file];
        !piece.dropped && file.needed && !file.done
    }

    fn why(&self) -> String {
        self.peers
            .iter()
            .map(|p| match (&p.gone, p.corrupt) {
                (_, true) => format!("{}: served a corrupt file", p.name),
                (Some(why), _) => format!("{}: {why}", p.name),
                (None, _) => format!("{}: served nothing in time", p.name),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn next_unpause(&self) -> Option<Instant> {
        let live = self.peers.iter().filter(|p| p.gone.is_none() && !p.corrupt);
        live.flat_map(|p| p.paused_until.into_iter().chain(p.refused.iter().map(|(_, at)| *at))).min()
    }

    /// Pieces refused by super-seeding peers whose pause is over count as
    /// theirs again.
    fn unrefuse(&mut self, now: Instant) {
        for peer in &mut self.peers {
            let has = &mut peer.has;
            peer.refused.retain(|&(piece, at)| {
                if at > now {
                    return true;
                }
                if let Some(has) = has.get_mut(piece) {
                    *has = true;
                }
                false
            });
        }
    }
}

/// The agent's peer service.
pub struct PeerServer {
    peers: Arc<Peers>,
}

type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl PeerServer {
    /// Only another node of this cluster may ask (checked when the service
    /// runs over TLS; a plaintext agent serves anyone who reaches it).
    fn check_caller<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.peers.tls.is_none() {
            return Ok(());
        }
        let certs = request.peer_certs().ok_or_else(|| Status::unauthenticated("present a node certificate"))?;
        let first = certs.first().ok_or_else(|| Status::unauthenticated("present a node certificate"))?;
        match identity_of(first) {
            Ok(id) if id.kind == PeerKind::Node => Ok(()),
            Ok(id) => Err(Status::permission_denied(format!("{:?} {:?} is not a node", id.kind, id.name))),
            Err(e) => Err(Status::permission_denied(e.to_string())),
        }
    }

    async fn user(&self, user: &str, sha256: &str) -> Result<(RankIdentity, PathBuf), Status> {
        if !is_sha256_hex(sha256) {
            return Err(Status::invalid_argument(format!("sha256 {sha256:?} is not 64 lowercase hex digits")));
        }
        let identity = self
            .peers
            .rank_users
            .resolve_blocking(user)
            .await
            .map_err(|e| Status::failed_precondition(format!("user {user:?} on node {}: {e}", self.peers.node)))?;
        let cache = user_cache(&self.peers.cache_root, &identity).map_err(|e| Status::internal(e.to_string()))?;
        Ok((identity, cache))
    }
}

/// The modes of complete content in `cache` that a copy from peers should
/// get (`job_files::content::modes`), read as the user; none if that fails
/// (the copy then has the default modes, and this node says why).
async fn modes_of(user: AsJobUser<'_>, cache: &Path, digest: &str) -> Vec<cohort_proto::PathMode> {
    match user.content_modes(cache, digest).await {
        Ok(modes) => modes
            .unwrap_or_default()
            .into_iter()
            .map(|m| cohort_proto::PathMode { path: m.path, mode: m.mode })
            .collect(),
        Err(e) => {
            tracing::warn!(content = %digest, error = %e, "cannot list the content's modes; peers get the default ones");
            Vec::new()
        }
    }
}

/// The manifest of complete content in `cache`, read as the user; None: not here.
async fn read_manifest(user: AsJobUser<'_>, cache: &Path, digest: &str) -> Result<Option<Vec<u8>>, String> {
    let Some(mut reader) = user.read_content(cache, digest, None, None).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let mut manifest = Vec::with_capacity(usize::try_from(reader.bytes).unwrap_or(0).min(MAX_MANIFEST));
    while let Some(chunk) = reader.next().await {
        manifest.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        if manifest.len() > MAX_MANIFEST {
            return Err("the manifest is larger than 256 MiB".into());
        }
    }
    Ok(Some(manifest))
}

#[tonic::async_trait]
impl PeerService for PeerServer {
    type WatchContentStream = ServerStream<ContentHave>;
    type FetchPieceStream = ServerStream<PieceChunk>;

    async fn watch_content(
        &self,
        request: Request<ContentRequest>,
    ) -> Result<Response<Self::WatchContentStream>, Status> {
        self.check_caller(&request)?;
        let ContentRequest { user, sha256 } = request.into_inner();
        let (identity, cache) = self.user(&user, &sha256).await?;
        let staging = self.peers.watch(&cache, &sha256);
        let helper = self.peers.helper.clone();
        if staging.is_none() {
            let user = AsJobUser { identity: &identity, helper: &helper };
            return match read_manifest(user, &cache, &sha256).await.map_err(Status::internal)? {
                Some(manifest) => {
                    // The large files' pieces first, so the peer can fetch them piece by piece.
                    let files = self.peers.describe(user, &cache, &sha256, &manifest).await.to_vec();
                    let modes = modes_of(user, &cache, &sha256).await;
                    let have = ContentHave { files, manifest, modes, ..ContentHave::default() };
                    Ok(Response::new(Box::pin(futures::stream::iter([Ok(have)]))))
                }
                None => Err(Status::not_found(format!("node {} neither holds nor stages {sha256}", self.peers.node))),
            };
        }
        let (tx, rx) = mpsc::channel(16);
        let peers = self.peers.clone();
        tokio::spawn(async move {
            let Some(mut staging) = staging else { return };
            let mut sent = 0;
            let mut first = true;
            // When the bytes read from the source were last told, and how many.
            let mut told: Option<Instant> = None;
            let mut told_bytes = 0;
            loop {
                let (files, state, fetching, source_bytes) = {
                    let have = staging.borrow_and_update();
                    (have.files.get(sent..).unwrap_or_default().to_vec(), have.state, have.fetching, have.source_bytes)
                };
                let keepalive = source_bytes > 0 && told.is_none_or(|t| t.elapsed() >= SOURCE_BYTES_EVERY);
                if !files.is_empty() || (first && fetching) || keepalive {
                    sent += files.len();
                    if keepalive {
                        told = Some(Instant::now());
                        told_bytes = source_bytes;
                    }
                    let have =
                        ContentHave { files, fetching: first && fetching, source_bytes, ..ContentHave::default() };
                    if tx.send(Ok(have)).await.is_err() {
                        return;
                    }
                }
                first = false;
                let ended = match state {
                    HaveState::Staging => staging.changed().await.is_err(),
                    _ => true,
                };
                if ended {
                    let user = AsJobUser { identity: &identity, helper: &helper };
                    let last = match read_manifest(user, &cache, &sha256).await {
                        Ok(Some(manifest)) => {
                            let modes = modes_of(user, &cache, &sha256).await;
                            // Nothing was offered while it was staged (a single
                            // file): its large files' pieces now, as for content
                            // that was complete when asked.
                            let files = if sent == 0 {
                                let described = peers.describe(user, &cache, &sha256, &manifest);
                                let Some(files) = telling_meanwhile(described, &tx, told_bytes).await else { return };
                                files
                            } else {
                                Vec::new()
                            };
                            Ok(ContentHave { files, manifest, modes, ..ContentHave::default() })
                        }
                        Ok(None) => Err(Status::aborted("staging it failed here")),
                        Err(e) => Err(Status::internal(e)),
                    };
                    let _ = tx.send(last).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn fetch_piece(&self, request: Request<PieceRequest>) -> Result<Response<Self::FetchPieceStream>, Status> {
        self.check_caller(&request)?;
        let permit = self.peers.uploads.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("node {} serves {UPLOAD_SLOTS} pieces already", self.peers.node))
        })?;
        let PieceRequest { user, sha256, path, piece_bytes, piece } = request.into_inner();
        let (identity, cache) = self.user(&user, &sha256).await?;
        let key = (cache.clone(), sha256.clone());
        let staging = self.peers.watch(&cache, &sha256);
        // Under way here: only what was announced (checked) is served, not
        // the rest of a file still coming in pieces.
        if let Some(staging) = &staging
            && !staging.borrow().holds(&path, piece_bytes, piece)
        {
            return Err(Status::not_found(format!(
                "node {} has no piece {piece} of {path:?} of {sha256} yet",
                self.peers.node
            )));
        }
        {
            let mut seeding = lock(&self.peers.seeding);
            if let Some(seed) = seeding.get_mut(&key) {
                if !seed.serve(&piece_key(&path, piece_bytes, piece)) {
                    return Err(Status::failed_precondition(format!(
                        "node {} sent piece {piece} of {path:?} once already and has pieces nobody has yet: fetch it from a node it went to",
                        self.peers.node
                    )));
                }
                if seed.over() && staging.is_none() {
                    seeding.remove(&key);
                }
            }
        }
        let span = (piece_bytes > 0).then(|| Span { offset: u64::from(piece) * piece_bytes, len: piece_bytes });
        let helper = self.peers.helper.clone();
        let reader = AsJobUser { identity: &identity, helper: &helper }
            .read_content(&cache, &sha256, Some(Path::new(&path)), span)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("node {} has no {path:?} of {sha256} (yet)", self.peers.node)))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            let mut reader = reader;
            while let Some(chunk) = reader.next().await {
                let chunk = chunk.map_err(|e| Status::internal(e.to_string()));
                let failed = chunk.is_err();
                for part in split(chunk) {
                    if tx.send(part).await.is_err() {
                        return;
                    }
                }
                if failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// A chunk of a file as `PieceChunk`s of at most [`CHUNK`] bytes.
fn split(chunk: Result<Vec<u8>, Status>) -> Vec<Result<PieceChunk, Status>> {
    match chunk {
        Ok(data) if data.len() <= CHUNK => vec![Ok(PieceChunk { data })],
        Ok(data) => data.chunks(CHUNK).map(|c| Ok(PieceChunk { data: c.to_vec() })).collect(),
        Err(status) => vec![Err(status)],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// The node reading the source dies: peers that fetch themselves can
    /// pass on what they hold, and once that is here nothing more can come,
    /// so the fetch gives up at once (the source is read) rather than
    /// waiting out [`STALL`].
    #[test]
    fn with_the_source_reader_gone_fetching_peers_are_waited_for_only_while_they_hold_something() {
        let file = |path: &str| ContentFile { path: path.into(), size: 3, sha256: hex(7), ..ContentFile::default() };
        let mut swarm = Swarm::new(&hex(1), vec!["reader".into(), "fetcher".into()]);
        swarm.event(PeerEvent::Fetching(1));
        swarm.event(PeerEvent::Files(0, vec![file("a"), file("b")]));
        swarm.event(PeerEvent::Files(1, vec![file("a")]));
        assert!(!swarm.hopeless(), "the reader may offer more");
        swarm.event(PeerEvent::Gone(0, "its staging failed".into()));
        assert!(!swarm.hopeless(), "the fetcher holds a, needed here");
        swarm.files[0].done = true;
        assert!(swarm.hopeless(), "b was only ever with the reader: nobody left can bring it");
        // A peer not heard from yet may still read the source.
        let mut quiet = Swarm::new(&hex(1), vec!["reader".into(), "fetcher".into()]);
        quiet.event(PeerEvent::Fetching(1));
        assert!(!quiet.hopeless());
    }

    /// A super-seeding peer's refusal (it sent the piece once already) holds
    /// for [`REFUSED_PAUSE`]: the node it went to may die before passing it
    /// on. A peer that does not have the piece is not asked for it again.
    #[test]
    fn a_piece_a_seed_refused_is_asked_of_it_again_later_one_it_lacks_is_not() {
        let peers = peers();
        let announced = peers.announce_fetch(Path::new("/c"), &hex(0)).unwrap();
        let file = |path: &str| ContentFile { path: path.into(), size: 3, sha256: hex(7), ..ContentFile::default() };
        let mut swarm = Swarm::new(&hex(0), vec!["seed".into(), "other".into()]);
        swarm.event(PeerEvent::Files(0, vec![file("a")]));
        swarm.event(PeerEvent::Files(1, vec![file("b")]));
        let mut random = || 0;
        let now = Instant::now();
        let mut asked = Vec::new();
        while let Some((piece, peer)) = swarm.choose(now, swarm::Limits::DEFAULT, &mut random) {
            swarm.start(piece, peer);
            asked.push((piece, peer));
        }
        assert_eq!(asked.len(), 2, "{asked:?}");
        for (piece, peer) in asked {
            let refusal = match peer {
                0 => Status::failed_precondition("sent once already"),
                _ => Status::not_found("not here"),
            };
            swarm.finished(piece, peer, Err(refusal), &announced);
        }
        assert_eq!(swarm.choose(now, swarm::Limits::DEFAULT, &mut random), None, "nobody offers either now");
        let at = swarm.next_unpause().unwrap();
        assert!(at >= now + REFUSED_PAUSE, "woken when the refusal is over");
        swarm.unrefuse(at - Duration::from_millis(1));
        assert_eq!(swarm.peers[0].has, [false, false], "not before");
        swarm.unrefuse(at);
        assert_eq!(swarm.peers[0].has, [true, false], "the seed's piece is its again");
        assert_eq!(swarm.peers[1].has, [false, false], "the piece the other lacked stays lacking");
        assert_eq!(swarm.choose(at, swarm::Limits::DEFAULT, &mut random), Some((0, 0)));
    }

    fn peers() -> Arc<Peers> {
        Peers::new(
            "me".into(),
            None,
            "/nonexistent".into(),
            "/nonexistent".into(),
            RankUserPolicy::agent_user(),
            4,
            STALL,
        )
    }

    /// A 10-byte file in pieces of 4: three pieces.
    fn shard(pieces: Vec<u32>, digests: bool) -> ContentFile {
        ContentFile {
            path: "model.safetensors".into(),
            size: 10,
            sha256: hex(9),
            piece_bytes: 4,
            piece_sha256: if digests { vec![hex(1), hex(2), hex(3)] } else { Vec::new() },
            pieces,
        }
    }

    fn announced_log(peers: &Peers) -> Vec<ContentFile> {
        peers.watch(Path::new("/c"), &hex(0)).unwrap().borrow().files.clone()
    }

    #[test]
    fn a_file_in_pieces_is_fetched_piece_by_piece_offered_on_and_completed_once() {
        let peers = peers();
        let announced = peers.announce_fetch(Path::new("/c"), &hex(0)).unwrap();
        let mut swarm = Swarm::new(&hex(0), vec!["a".into(), "b".into()]);
        // Pieces of a file whose digests this node never got are of no use.
        assert!(!swarm.event(PeerEvent::Files(1, vec![shard(vec![1], false)])));
        assert!(swarm.files.is_empty());
        assert!(swarm.event(PeerEvent::Files(0, vec![shard(vec![], true)])));
        assert!(swarm.event(PeerEvent::Files(1, vec![shard(vec![1], false)])));
        assert_eq!(swarm.pieces.iter().map(|p| (p.offset, p.len)).collect::<Vec<_>>(), [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(swarm.peers[1].has, [false, true, false]);
        // Another cut of the same file from a peer is not taken.
        let other_cut = ContentFile { piece_bytes: 5, ..shard(vec![0], true) };
        assert!(!swarm.event(PeerEvent::Files(1, vec![other_cut])));

        let mut random = || 0;
        let (mut got, mut steps) = (Vec::new(), Vec::new());
        while got.len() < 3 {
            let mut round = Vec::new();
            while let Some((piece, peer)) = swarm.choose(Instant::now(), swarm::Limits::DEFAULT, &mut random) {
                let wanted = swarm.start(piece, peer);
                let span = wanted.piece.as_ref().unwrap();
                let p = &swarm.pieces[piece];
                assert_eq!(
                    (span.span.offset, span.span.len, span.sha256.as_str()),
                    (p.offset, p.len, p.sha256.as_str())
                );
                round.push((piece, peer));
            }
            assert!(!round.is_empty(), "a piece to fetch while some are missing");
            for (piece, peer) in round {
                got.push(piece);
                steps.push(swarm.finished(piece, peer, Ok(Received::Done), &announced).finish);
            }
        }
        // The rarest first (pieces 0 and 2 have one holder, piece 1 two), one
        // request per peer; piece 1 from peer b while peer a is busy.
        assert!(got[0] == 0 || got[0] == 2, "{got:?}");
        assert_eq!(got[1], 1, "{got:?}");
        assert_eq!(steps, [None, None, Some(0)], "completed once the last piece is in");
        assert_eq!(swarm.fetched.bytes, 10);
        // Each piece offered on as it came, the digests with the first word only.
        let log = announced_log(&peers);
        let order: Vec<Vec<u32>> = got.iter().map(|&p| vec![p as u32]).collect();
        assert_eq!(log.iter().map(|f| f.pieces.clone()).collect::<Vec<_>>(), order);
        assert_eq!(log.iter().map(|f| f.piece_sha256.len()).collect::<Vec<_>>(), [3, 0, 0]);
        assert!(swarm.done().is_none(), "not complete before the whole is checked");

        assert!(swarm.file_finished(0, Ok(Received::Done), &announced));
        let log = announced_log(&peers);
        assert!(log.last().unwrap().pieces.is_empty(), "then offered whole");
        let manifest = format!("{} 10 model.safetensors\n", hex(9));
        let digest = format!("{:x}", Sha256::digest(manifest.as_bytes()));
        swarm.digest = digest;
        assert!(swarm.event(PeerEvent::Manifest(0, manifest.clone().into_bytes(), Vec::new())));
        assert_eq!(swarm.done(), Some(manifest));
    }

    /// A single file, which its reader offers only once it is complete: the
    /// bytes it read so far count as progress while they grow (not a stall),
    /// and its manifest of that file alone (the file's digest the content's)
    /// is taken, where one naming the file under another digest is not.
    #[test]
    fn a_single_file_is_awaited_while_its_reader_reads_and_taken_by_its_own_digest() {
        let mut swarm = Swarm::new(&hex(7), vec!["a".into(), "b".into()]);
        assert!(swarm.event(PeerEvent::Reading(0, 1 << 20)));
        assert!(!swarm.event(PeerEvent::Reading(0, 1 << 20)), "told again, nothing more read: no progress");
        assert!(swarm.event(PeerEvent::Reading(0, 2 << 20)));
        assert!(!swarm.event(PeerEvent::Reading(1, 0)));
        assert!(!swarm.hopeless(), "the reader is still there");

        let other = format!("{} 10 data.bin\n", hex(8));
        assert!(!swarm.event(PeerEvent::Manifest(1, other.into_bytes(), Vec::new())));
        assert!(swarm.peers[1].corrupt, "a manifest of other content names its sender");
        let manifest = format!("{} 10 data.bin\n", hex(7));
        assert!(swarm.event(PeerEvent::Manifest(0, manifest.into_bytes(), Vec::new())));
        assert_eq!(swarm.files.len(), 1);
        assert_eq!((swarm.files[0].path.as_str(), swarm.files[0].sha256.clone()), ("data.bin", hex(7)));
    }

    #[test]
    fn wrong_piece_digests_name_their_giver_and_the_file_is_fetched_whole() {
        let peers = peers();
        let announced = peers.announce_fetch(Path::new("/c"), &hex(0)).unwrap();
        let mut swarm = Swarm::new(&hex(0), vec!["a".into(), "b".into()]);
        swarm.event(PeerEvent::Files(0, vec![shard(vec![], true)]));
        swarm.event(PeerEvent::Files(1, vec![shard(vec![], false)]));
        for piece in 0..3 {
            swarm.start(piece, 0);
            swarm.finished(piece, 0, Ok(Received::Done), &announced);
        }
        assert!(!swarm.file_finished(0, Ok(Received::Corrupt { actual: hex(7) }), &announced));
        assert!(swarm.peers[0].corrupt && swarm.fetched.corrupt_peers == ["a"]);
        let file = &swarm.files[0];
        assert_eq!((file.piece_bytes, file.pieces.len(), file.done), (0, 1, false));
        let whole = file.pieces.start;
        assert_eq!(swarm.pieces[whole].sha256, hex(9), "the whole is checked against the file's digest");
        // Peer b held every piece: it holds the whole.
        assert!(swarm.peers[1].has[whole]);
        let (piece, peer) = swarm.choose(Instant::now(), swarm::Limits::DEFAULT, &mut || 0).unwrap();
        assert_eq!((piece, peer), (whole, 1));
        assert!(swarm.start(piece, peer).piece.is_none(), "fetched as one file");
    }

    #[test]
    fn a_file_that_cannot_be_completed_here_gives_the_fetch_up_after_a_few_tries() {
        let peers = peers();
        let announced = peers.announce_fetch(Path::new("/c"), &hex(0)).unwrap();
        let mut swarm = Swarm::new(&hex(0), vec!["a".into()]);
        swarm.event(PeerEvent::Files(0, vec![shard(vec![], true)]));
        for tries in 1..=FINISH_TRIES {
            assert!(swarm.broken.is_none());
            for piece in 0..3 {
                swarm.start(piece, 0);
                swarm.finished(piece, 0, Ok(Received::Done), &announced);
            }
            swarm.file_finished(0, Err("permission denied".into()), &announced);
            assert!(swarm.pieces.iter().all(|p| p.mine == Mine::Missing), "try {tries}: fetched again");
        }
        assert!(swarm.broken.as_ref().unwrap().contains("permission denied"));
        assert!(!swarm.peers[0].corrupt, "not the peer's fault");
    }
}
