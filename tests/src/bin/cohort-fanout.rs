//! `cohort-fanout`: how long staging one directory to N nodes takes when every
//! node reads the source, against peer-to-peer staging (issue 18), where
//! `--source-pulls` nodes read the source and the others fetch the pieces
//! (the directory's files) from each other, each choosing its next piece and
//! peer with the agent's own policy, [`cohort_shared::swarm::choose`].
//!
//! A discrete-event simulation of the bytes only. Every node has a full-duplex
//! link of `--link-mbps` each way; the source serves `--source-mbps` in all.
//! A transfer's rate is the smaller of its sender's upload share and its
//! receiver's download share (each link shared equally among that node's
//! transfers, the source among its readers), recomputed at every event
//! (processor sharing); `--sharing max-min` gives TCP-like max-min fair rates
//! instead (what one transfer cannot use goes to the others). A node serves at
//! most [`UPLOAD_SLOTS`] uploads: a peer serving that many is not usable to a
//! node choosing (the agent learns it from a refusal). Every node knows what
//! every other node holds. Pullers read the source in manifest order,
//! [`Limits::total`] pieces at once, serve what they have and fetch nothing
//! from peers. Transfers that end at the same moment are taken one at a time
//! in random order, each followed by the choices it allows.
//!
//! ```text
//! cargo build -p cohort-tests --bin cohort-fanout
//! target/debug/cohort-fanout                               # 1..1,024 nodes, 64 pieces of 32 MiB, 1 Gbit/s
//! target/debug/cohort-fanout --nodes 8,64 --source-pulls 2 --json
//! target/debug/cohort-fanout --nodes 64 --dead 8@5         # 8 nodes die 5 s in
//! ```
//!
//! `--total`, `--per-peer`, `--upload-slots`, `--rarity-over all` and
//! `--super-seed` try other limits and policies than the agent's;
//! `--request-ms` adds a wait to every request between nodes (the transfer
//! holds its slots and moves nothing for that long).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, ensure};
use clap::{Parser, ValueEnum};
use cohort_shared::swarm::{self, Limits, Mine, PeerView, UPLOAD_SLOTS};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Simulated fan-out of one directory to N nodes: all from the source against peer-to-peer")]
struct Args {
    /// Node counts, one simulation of each strategy per count, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,64,1024")]
    nodes: Vec<usize>,
    /// Pieces (files) of the directory.
    #[arg(long, default_value_t = 64)]
    pieces: usize,
    /// Size of each piece, MiB.
    #[arg(long, default_value_t = 32.0)]
    piece_mib: f64,
    /// Each node's link, megabits per second, each way (1000: 125 MB/s).
    #[arg(long, default_value_t = 1000.0)]
    link_mbps: f64,
    /// The source's rate in all, megabits per second, shared among its readers (default: one link's).
    #[arg(long)]
    source_mbps: Option<f64>,
    /// Nodes that read the source under peer-to-peer (the controller's `--max-source-pulls`).
    #[arg(long, default_value_t = 1)]
    source_pulls: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// K@T: K random nodes that do not read the source die at simulated second T (peer-to-peer only;
    /// their transfers fail, their own completion is not counted).
    #[arg(long, value_name = "K@T")]
    dead: Option<Dead>,
    /// Uploads a node serves at once (the agent's `swarm::UPLOAD_SLOTS`).
    #[arg(long, default_value_t = UPLOAD_SLOTS)]
    upload_slots: u32,
    /// A node's concurrent requests to one peer (`swarm::Limits::per_peer`).
    #[arg(long, default_value_t = Limits::DEFAULT.per_peer)]
    per_peer: u32,
    /// A node's concurrent downloads (`swarm::Limits::total`); also the pullers' source reads at once.
    #[arg(long, default_value_t = Limits::DEFAULT.total)]
    total: u32,
    /// How transfers share links: `equal` (min of the two equal shares) or `max-min` (TCP-like).
    #[arg(long, value_enum, default_value_t = Sharing::Equal)]
    sharing: Sharing,
    /// Which peers' pieces count for rarity: `usable` ones (the policy), or `all` live ones,
    /// peers busy at their upload slots included (they are still not asked).
    #[arg(long, value_enum, default_value_t = Rarity::Usable)]
    rarity_over: Rarity,
    /// Pullers offer a piece only while they neither send it nor sent it once,
    /// until they sent every piece once (as the agent does); `--super-seed
    /// false`: they offer every piece they hold.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    super_seed: bool,
    /// Milliseconds from a node's request to a peer until the piece's
    /// bytes flow (the request, the peer opening the piece, the first
    /// bytes), during which the transfer holds its upload slot and its
    /// download but moves nothing. 0: at once, as before.
    #[arg(long, default_value_t = 0.0)]
    request_ms: f64,
    /// Nodes per rack (in index order; the pullers in the first rack); 0:
    /// no racks, any two nodes reach each other at their links' rates.
    #[arg(long, default_value_t = 0)]
    rack_nodes: usize,
    /// Each rack's link to the core, megabits per second, each way, shared
    /// by the transfers that leave or enter the rack (the source sits in the
    /// core); default: a quarter of its nodes' links (4:1 oversubscribed).
    #[arg(long)]
    uplink_mbps: Option<f64>,
    /// One node of each rack (its first; in the pullers' rack, none) fetches
    /// from other racks, the others only from their rack (the controller's
    /// peer assignment with `--topology-label`); `--near false`: any peer alike.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    near: bool,
    /// One JSON object per node count, one a line, instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Sharing {
    Equal,
    MaxMin,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Rarity {
    Usable,
    All,
}

/// `--dead K@T`.
#[derive(Debug, Clone, Copy)]
struct Dead {
    nodes: usize,
    at_s: f64,
}

impl FromStr for Dead {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (k, t) = s.split_once('@').ok_or("expected K@T, e.g. 8@5")?;
        let nodes = k.parse().map_err(|e| format!("K: {e}"))?;
        let at_s: f64 = t.parse().map_err(|e| format!("T: {e}"))?;
        if !(at_s.is_finite() && at_s >= 0.0) {
            return Err("T: seconds, at least 0".into());
        }
        Ok(Dead { nodes, at_s })
    }
}

/// One simulation's parameters.
#[derive(Debug, Clone, Copy)]
struct Config {
    nodes: usize,
    pieces: usize,
    piece_bytes: f64,
    /// Bytes per second, each way, of every node.
    link: f64,
    /// Bytes per second of the source, in all.
    source: f64,
    /// The first `pulls` nodes read the source; the others fetch from peers.
    pulls: usize,
    limits: Limits,
    upload_slots: u32,
    sharing: Sharing,
    rarity: Rarity,
    super_seed: bool,
    dead: Option<Dead>,
    seed: u64,
    /// Seconds a transfer between nodes waits before its bytes flow.
    request_s: f64,
    /// Nodes per rack (0: no racks), each rack's link to the core in bytes
    /// per second each way, and whether one node a rack fetches for it.
    rack_nodes: usize,
    uplink: f64,
    near: bool,
}

impl Config {
    /// The rack of node `i`, when racks are modelled.
    fn rack(&self, i: usize) -> Option<usize> {
        (self.rack_nodes > 0).then(|| i / self.rack_nodes)
    }

    /// Whether node `i` fetches for its rack from other racks (with `--near`):
    /// the first node of a rack without a puller. The others of its rack ask
    /// only their rack (the controller's assignment with `--topology-label`).
    fn leads(&self, i: usize) -> bool {
        self.rack_nodes > 0 && i.is_multiple_of(self.rack_nodes) && i >= self.pulls
    }

    /// Whether node `w` may ask node `u`: with racks and `--near`, a node
    /// other than its rack's leader asks only its rack.
    fn may_ask(&self, w: usize, u: usize) -> bool {
        let local = self.near && self.rack(w).is_some() && !self.leads(w);
        !local || self.rack(u) == self.rack(w)
    }

    /// The racks whose core links a transfer from `from` to `to` crosses:
    /// (the sender's, leaving; the receiver's, entering). The source is in the core.
    fn crossing(&self, from: Sender, to: usize) -> (Option<usize>, Option<usize>) {
        let inbound = self.rack(to);
        match from {
            Sender::Source => (None, inbound),
            Sender::Node(u) if self.rack(u) != inbound => (self.rack(u), inbound),
            Sender::Node(_) => (None, None),
        }
    }
}

/// What one simulation measured.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// When the last live node had every piece; infinite when one never did.
    last_s: f64,
    mean_s: f64,
    /// Live nodes with every piece, of `live`.
    finished: usize,
    live: usize,
    source_bytes: f64,
    /// Bytes moved between peers.
    peer_bytes: f64,
    /// Pieces the pullers sent to peers (the directory's pieces once each, at best).
    puller_uploads: u64,
    /// Transfers that a death cut short.
    failed: u64,
    events: u64,
    /// Bytes that entered racks over their core links (the source's included).
    cross_rack_bytes: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sender {
    Source,
    Node(usize),
}

struct Transfer {
    piece: usize,
    from: Sender,
    to: usize,
    left: f64,
    rate: f64,
    /// When its bytes start to flow (`--request-ms` after it started).
    ready_s: f64,
}

struct Node {
    mine: Vec<Mine>,
    count: usize,
    /// Per piece, offered to peers (held, unless a super-seeding puller hides it), and as a bit set.
    offer: Vec<bool>,
    offered: Vec<u64>,
    /// Bit set of the pieces missing (neither held nor in flight).
    missing: Vec<u64>,
    /// Per piece, uploads of it now, and uploads of it done.
    sending: Vec<u32>,
    sent: Vec<u32>,
    /// Pieces not uploaded once yet.
    unsent: usize,
    uploads: u32,
    downloads: u32,
    /// The peer of each download from a peer now.
    from: Vec<usize>,
    /// Pullers: the next piece to read from the source.
    next: usize,
    puller: bool,
    dead: bool,
    done_s: Option<f64>,
}

impl Node {
    fn new(pieces: usize, puller: bool) -> Self {
        let words = pieces.div_ceil(64);
        let mut missing = vec![u64::MAX; words];
        if !pieces.is_multiple_of(64) {
            missing[words - 1] = (1u64 << (pieces % 64)) - 1;
        }
        Node {
            mine: vec![Mine::Missing; pieces],
            count: 0,
            offer: vec![false; pieces],
            offered: vec![0; words],
            missing,
            sending: vec![0; pieces],
            sent: vec![0; pieces],
            unsent: pieces,
            uploads: 0,
            downloads: 0,
            from: Vec::new(),
            next: 0,
            puller,
            dead: false,
            done_s: None,
        }
    }

    fn set_offer(&mut self, piece: usize, on: bool) {
        self.offer[piece] = on;
        let bit = 1 << (piece % 64);
        if on {
            self.offered[piece / 64] |= bit;
        } else {
            self.offered[piece / 64] &= !bit;
        }
    }

    fn requests_to(&self, peer: usize) -> u32 {
        self.from.iter().filter(|&&p| p == peer).count() as u32
    }
}

fn intersects(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).any(|(x, y)| x & y != 0)
}

/// A set of node indices with O(1) insert, remove and membership.
struct Set {
    items: Vec<usize>,
    position: Vec<Option<usize>>,
}

impl Set {
    fn new(n: usize) -> Self {
        Set { items: Vec::new(), position: vec![None; n] }
    }

    fn contains(&self, i: usize) -> bool {
        self.position[i].is_some()
    }

    fn set(&mut self, i: usize, member: bool) {
        match (self.position[i], member) {
            (None, true) => {
                self.position[i] = Some(self.items.len());
                self.items.push(i);
            }
            (Some(at), false) => {
                self.items.swap_remove(at);
                if let Some(&moved) = self.items.get(at) {
                    self.position[moved] = Some(at);
                }
                self.position[i] = None;
            }
            _ => {}
        }
    }
}

struct Sim {
    cfg: Config,
    nodes: Vec<Node>,
    active: Vec<Transfer>,
    source_readers: u32,
    /// Live nodes offering a piece and below their upload slots: the peers a node may ask.
    usable: Set,
    /// Live fetching nodes below their download limit whose last choice found nothing.
    waiting: Set,
    rng: ChaCha8Rng,
    now: f64,
    source_bytes: f64,
    peer_bytes: f64,
    puller_uploads: u64,
    failed: u64,
    events: u64,
    cross_rack_bytes: f64,
}

impl Sim {
    fn new(cfg: Config) -> Self {
        Sim {
            cfg,
            nodes: (0..cfg.nodes).map(|i| Node::new(cfg.pieces, i < cfg.pulls)).collect(),
            active: Vec::new(),
            source_readers: 0,
            usable: Set::new(cfg.nodes),
            waiting: Set::new(cfg.nodes),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            now: 0.0,
            source_bytes: 0.0,
            peer_bytes: 0.0,
            puller_uploads: 0,
            failed: 0,
            events: 0,
            cross_rack_bytes: 0.0,
        }
    }

    fn run(mut self) -> Outcome {
        let mut dead = self.cfg.dead;
        let mut changed = Vec::new();
        let mut receivers: Vec<usize> = (0..self.cfg.nodes).collect();
        if self.cfg.pieces == 0 {
            for node in &mut self.nodes {
                node.done_s = Some(0.0);
            }
        }
        self.schedule(&mut receivers, &mut changed);
        while !self.active.is_empty() {
            self.events += 1;
            match self.cfg.sharing {
                Sharing::Equal => self.equal_rates(),
                Sharing::MaxMin => self.max_min_rates(),
            }
            let dt = self
                .active
                .iter()
                .map(|t| if self.waits(t) { t.ready_s - self.now } else { t.left / t.rate })
                .fold(f64::INFINITY, f64::min);
            if let Some(d) = dead.filter(|d| d.at_s < self.now + dt) {
                dead = None;
                self.advance(d.at_s - self.now);
                self.kill(d.nodes, &mut receivers, &mut changed);
                self.schedule(&mut receivers, &mut changed);
                continue;
            }
            self.advance(dt);
            // Pieces moving at the same rate since the same moment end together:
            // one at a time, in random order, each followed by the choices it
            // allows, as each would be seen at its own moment.
            let eps = self.cfg.piece_bytes * 1e-9;
            let mut ended = Vec::new();
            let mut i = 0;
            while i < self.active.len() {
                if self.active[i].left <= eps {
                    ended.push(self.active.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            ended.shuffle(&mut self.rng);
            for t in ended {
                self.complete(t, &mut receivers, &mut changed);
                self.schedule(&mut receivers, &mut changed);
            }
        }
        let live: Vec<&Node> = self.nodes.iter().filter(|n| !n.dead).collect();
        let done: Vec<f64> = live.iter().filter_map(|n| n.done_s).collect();
        let last_s = if done.len() == live.len() { done.iter().copied().fold(0.0, f64::max) } else { f64::INFINITY };
        Outcome {
            last_s,
            mean_s: done.iter().sum::<f64>() / done.len().max(1) as f64,
            finished: done.len(),
            live: live.len(),
            source_bytes: self.source_bytes,
            peer_bytes: self.peer_bytes,
            puller_uploads: self.puller_uploads,
            failed: self.failed,
            events: self.events,
            cross_rack_bytes: self.cross_rack_bytes,
        }
    }

    /// Whether transfer `t` still waits for its bytes to flow.
    fn waits(&self, t: &Transfer) -> bool {
        t.ready_s > self.now + 1e-12
    }

    /// Each transfer: the smaller of its sender's and its receiver's equal
    /// shares, among the transfers whose bytes flow.
    /// With racks, also of its racks' core links' equal shares, out and in.
    fn equal_rates(&mut self) {
        let (mut ups, mut downs, mut readers) = (vec![0u32; self.cfg.nodes], vec![0u32; self.cfg.nodes], 0u32);
        let racks = if self.cfg.rack_nodes > 0 { self.cfg.nodes.div_ceil(self.cfg.rack_nodes) } else { 0 };
        let (mut outs, mut ins) = (vec![0u32; racks], vec![0u32; racks]);
        for t in self.active.iter().filter(|t| !self.waits(t)) {
            match t.from {
                Sender::Source => readers += 1,
                Sender::Node(u) => ups[u] += 1,
            }
            downs[t.to] += 1;
            let (out, inbound) = self.cfg.crossing(t.from, t.to);
            out.into_iter().for_each(|r| outs[r] += 1);
            inbound.into_iter().for_each(|r| ins[r] += 1);
        }
        let now = self.now;
        let cfg = self.cfg;
        for t in &mut self.active {
            if t.ready_s > now + 1e-12 {
                t.rate = 0.0;
                continue;
            }
            let up = match t.from {
                Sender::Source => cfg.source / f64::from(readers),
                Sender::Node(u) => cfg.link / f64::from(ups[u]),
            };
            let (out, inbound) = cfg.crossing(t.from, t.to);
            let core = out
                .map(|r| cfg.uplink / f64::from(outs[r]))
                .into_iter()
                .chain(inbound.map(|r| cfg.uplink / f64::from(ins[r])))
                .fold(f64::INFINITY, f64::min);
            t.rate = up.min(cfg.link / f64::from(downs[t.to])).min(core);
        }
    }

    /// Max-min fair rates (progressive filling): the link with the smallest
    /// fair share left fixes the rate of its transfers not fixed yet, which
    /// then take that much from their other link; until every rate is fixed.
    /// Links: 0 the source, 1 + 2i node i's upload, 2 + 2i its download.
    fn max_min_rates(&mut self) {
        let links = 1 + 2 * self.cfg.nodes;
        let ends = |t: &Transfer| {
            let up = match t.from {
                Sender::Source => 0,
                Sender::Node(u) => 1 + 2 * u,
            };
            [up, 2 + 2 * t.to]
        };
        let mut left: Vec<f64> = (0..links).map(|l| if l == 0 { self.cfg.source } else { self.cfg.link }).collect();
        let mut unfixed = vec![0u32; links];
        let mut fixed: Vec<bool> = self.active.iter().map(|t| self.waits(t)).collect();
        for (t, _) in self.active.iter().zip(&fixed).filter(|(_, waits)| !**waits) {
            for l in ends(t) {
                unfixed[l] += 1;
            }
        }
        for (t, waits) in self.active.iter_mut().zip(&fixed) {
            if *waits {
                t.rate = 0.0;
            }
        }
        // The transfers of each link, packed.
        let mut first = vec![0usize; links + 1];
        for l in 0..links {
            first[l + 1] = first[l] + unfixed[l] as usize;
        }
        let mut fill = first.clone();
        let mut on = vec![0usize; first[links]];
        for (i, t) in self.active.iter().enumerate().filter(|(i, _)| !fixed[*i]) {
            for l in ends(t) {
                on[fill[l]] = i;
                fill[l] += 1;
            }
        }
        let share = |left: &[f64], unfixed: &[u32], l: usize| left[l].max(0.0) / f64::from(unfixed[l]);
        let mut heap: BinaryHeap<Reverse<(Key, usize)>> =
            (0..links).filter(|&l| unfixed[l] > 0).map(|l| Reverse((Key(share(&left, &unfixed, l)), l))).collect();
        while let Some(Reverse((Key(s), l))) = heap.pop() {
            // A stale entry: the link's share changed since it was pushed.
            if unfixed[l] == 0 || share(&left, &unfixed, l) != s {
                continue;
            }
            for &i in &on[first[l]..first[l + 1]] {
                if fixed[i] {
                    continue;
                }
                fixed[i] = true;
                self.active[i].rate = s;
                for other in ends(&self.active[i]) {
                    left[other] -= s;
                    unfixed[other] -= 1;
                    if other != l && unfixed[other] > 0 {
                        heap.push(Reverse((Key(share(&left, &unfixed, other)), other)));
                    }
                }
            }
        }
    }

    fn advance(&mut self, dt: f64) {
        for t in &mut self.active {
            t.left -= t.rate * dt;
            if self.cfg.crossing(t.from, t.to).1.is_some() {
                self.cross_rack_bytes += t.rate * dt;
            }
        }
        self.now += dt;
    }

    fn refresh(&mut self, i: usize) {
        let n = &self.nodes[i];
        let usable = !n.dead && n.count > 0 && n.uploads < self.cfg.upload_slots;
        self.usable.set(i, usable);
        let waits =
            !n.dead && !n.puller && n.done_s.is_none() && u64::from(n.downloads) < u64::from(self.cfg.limits.total);
        self.waiting.set(i, waits);
    }

    /// What the pullers offer of `piece`: all they hold, or with
    /// `--super-seed` (what a puller knows by itself) only the pieces it
    /// neither sends now nor sent once, until it has sent every piece once.
    fn reoffer(&mut self, piece: usize) {
        if !self.cfg.super_seed {
            return;
        }
        for node in self.nodes.iter_mut().take(self.cfg.pulls) {
            let on = node.mine[piece] == Mine::Have
                && node.sending[piece] == 0
                && (node.sent[piece] == 0 || node.unsent == 0);
            node.set_offer(piece, on);
        }
    }

    fn start(&mut self, piece: usize, from: Sender, to: usize) {
        let node = &mut self.nodes[to];
        node.mine[piece] = Mine::InFlight;
        node.missing[piece / 64] &= !(1 << (piece % 64));
        node.downloads += 1;
        match from {
            Sender::Source => self.source_readers += 1,
            Sender::Node(u) => {
                node.from.push(u);
                self.nodes[u].uploads += 1;
                self.nodes[u].sending[piece] += 1;
                self.reoffer(piece);
                self.refresh(u);
            }
        }
        let ready_s = self.now + if matches!(from, Sender::Node(_)) { self.cfg.request_s } else { 0.0 };
        self.active.push(Transfer { piece, from, to, left: self.cfg.piece_bytes, rate: 0.0, ready_s });
    }

    /// The sender's side of a transfer that ended, either way.
    fn release(&mut self, t: &Transfer, changed: &mut Vec<usize>) {
        match t.from {
            Sender::Source => self.source_readers -= 1,
            Sender::Node(u) => {
                self.nodes[u].uploads -= 1;
                self.nodes[u].sending[t.piece] -= 1;
                let from = &mut self.nodes[t.to].from;
                if let Some(at) = from.iter().position(|&p| p == u) {
                    from.swap_remove(at);
                }
                self.refresh(u);
                changed.push(u);
            }
        }
        self.nodes[t.to].downloads -= 1;
    }

    fn complete(&mut self, t: Transfer, receivers: &mut Vec<usize>, changed: &mut Vec<usize>) {
        self.release(&t, changed);
        match t.from {
            Sender::Source => self.source_bytes += self.cfg.piece_bytes,
            Sender::Node(u) => {
                self.peer_bytes += self.cfg.piece_bytes;
                let sender = &mut self.nodes[u];
                self.puller_uploads += u64::from(sender.puller);
                sender.sent[t.piece] += 1;
                if sender.sent[t.piece] == 1 {
                    sender.unsent -= 1;
                    if sender.unsent == 0 {
                        // Every piece went out once: a super-seeding puller offers all again.
                        for piece in 0..self.cfg.pieces {
                            self.reoffer(piece);
                        }
                    }
                }
            }
        }
        let node = &mut self.nodes[t.to];
        node.mine[t.piece] = Mine::Have;
        node.set_offer(t.piece, true);
        node.count += 1;
        if node.count == self.cfg.pieces {
            node.done_s = Some(self.now);
        }
        self.reoffer(t.piece);
        self.refresh(t.to);
        changed.push(t.to);
        receivers.push(t.to);
    }

    /// `k` random live nodes that do not read the source die: what they sent
    /// or received ends, their receivers choose again.
    fn kill(&mut self, k: usize, receivers: &mut Vec<usize>, changed: &mut Vec<usize>) {
        let mut candidates: Vec<usize> = (0..self.cfg.nodes).filter(|&i| !self.nodes[i].puller).collect();
        for _ in 0..k.min(candidates.len()) {
            let i = candidates.swap_remove(self.rng.random_range(0..candidates.len()));
            self.nodes[i].dead = true;
            self.refresh(i);
        }
        let mut i = 0;
        while i < self.active.len() {
            let t = &self.active[i];
            let sender_dead = matches!(t.from, Sender::Node(u) if self.nodes[u].dead);
            if !sender_dead && !self.nodes[t.to].dead {
                i += 1;
                continue;
            }
            let t = self.active.swap_remove(i);
            self.failed += 1;
            self.release(&t, changed);
            self.reoffer(t.piece);
            let node = &mut self.nodes[t.to];
            node.mine[t.piece] = Mine::Missing;
            node.missing[t.piece / 64] |= 1 << (t.piece % 64);
            self.refresh(t.to);
            receivers.push(t.to);
        }
        // Pullers offer again what they failed to send.
        changed.extend(0..self.cfg.pulls);
    }

    /// Starts what can start after an event: pullers read on, the receivers
    /// of the transfers that ended choose again, then the waiting nodes that
    /// a `changed` peer (one that freed an upload slot or gained a piece) may
    /// serve choose, in random order.
    fn schedule(&mut self, receivers: &mut Vec<usize>, changed: &mut Vec<usize>) {
        for r in receivers.drain(..) {
            if self.nodes[r].dead {
                continue;
            }
            if self.nodes[r].puller {
                self.pull(r);
            } else {
                self.fetch(r);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        changed.retain(|&u| self.usable.contains(u));
        let len = self.waiting.items.len();
        if !changed.is_empty() && len > 0 {
            let offset = self.rng.random_range(0..len);
            // `fetch` changes the set: go over the nodes waiting now, in a rotated order.
            let order: Vec<usize> = (0..len).map(|k| self.waiting.items[(offset + k) % len]).collect();
            for w in order {
                if changed.iter().all(|&u| !self.usable.contains(u)) {
                    break;
                }
                if self.may_serve(w, changed) {
                    self.fetch(w);
                }
            }
        }
        changed.clear();
    }

    /// Whether one of `peers` could serve node `w` a piece it misses.
    fn may_serve(&self, w: usize, peers: &[usize]) -> bool {
        let node = &self.nodes[w];
        peers.iter().any(|&u| {
            u != w
                && self.usable.contains(u)
                && self.cfg.may_ask(w, u)
                && intersects(&self.nodes[u].offered, &node.missing)
                && node.requests_to(u) < self.cfg.limits.per_peer
        })
    }

    fn pull(&mut self, i: usize) {
        while self.nodes[i].downloads < self.cfg.limits.total && self.nodes[i].next < self.cfg.pieces {
            let piece = self.nodes[i].next;
            self.nodes[i].next += 1;
            self.start(piece, Sender::Source, i);
        }
    }

    /// Node `w` starts downloads as `swarm::choose` picks them, until it picks none.
    fn fetch(&mut self, w: usize) {
        let mut peers = Vec::new();
        loop {
            let Sim { nodes, usable, rng, cfg, .. } = self;
            let node = &nodes[w];
            // Only the usable peers offering a piece `w` misses: `choose` neither
            // asks nor counts an unusable peer, and one offering none of the
            // missing pieces counts for no candidate's rarity, so the choice is
            // the one over every node (up to how ties fall). With
            // `--rarity-over all`, busy peers too, counted but not asked.
            let offers = |&u: &usize| {
                u != w && !nodes[u].dead && cfg.may_ask(w, u) && intersects(&nodes[u].offered, &node.missing)
            };
            peers.clear();
            match cfg.rarity {
                Rarity::Usable => peers.extend(usable.items.iter().copied().filter(offers)),
                Rarity::All => peers.extend((0..nodes.len()).filter(offers)),
            }
            let views: Vec<PeerView<'_>> = peers
                .iter()
                .map(|&u| PeerView {
                    has: &nodes[u].offer,
                    // A busy peer: not askable (only with `--rarity-over all`).
                    in_flight: if usable.contains(u) { node.requests_to(u) } else { u32::MAX },
                    usable: true,
                })
                .collect();
            let Some((piece, peer)) = swarm::choose(&node.mine, &views, cfg.limits, &mut || rng.next_u64()) else {
                break;
            };
            self.start(piece, Sender::Node(peers[peer]), w);
        }
        self.refresh(w);
    }
}

/// An f64 ordered by `total_cmp`, for the heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Key(f64);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.piece_mib > 0.0 && args.link_mbps > 0.0, "--piece-mib and --link-mbps must be positive");
    ensure!(args.source_mbps.is_none_or(|s| s > 0.0), "--source-mbps must be positive");
    ensure!(args.source_pulls >= 1, "--source-pulls: at least 1");
    ensure!(args.total >= 1 && args.per_peer >= 1 && args.upload_slots >= 1, "limits: at least 1");
    ensure!(args.request_ms.is_finite() && args.request_ms >= 0.0, "--request-ms: at least 0");
    ensure!(!args.nodes.contains(&0), "--nodes: at least 1 each");
    ensure!(
        args.rack_nodes == 0 || args.sharing == Sharing::Equal,
        "--rack-nodes: racks are modelled with --sharing equal only"
    );
    ensure!(args.uplink_mbps.is_none_or(|u| u > 0.0), "--uplink-mbps must be positive");
    let link = args.link_mbps * 1e6 / 8.0;
    let source = args.source_mbps.map_or(link, |s| s * 1e6 / 8.0);
    let piece_bytes = args.piece_mib * 1024.0 * 1024.0;
    let size = piece_bytes * args.pieces as f64;
    let one_node_s = size / link.min(source);
    let limits = Limits { per_peer: args.per_peer, total: args.total };
    let uplink = args.uplink_mbps.map_or(link * args.rack_nodes as f64 / 4.0, |u| u * 1e6 / 8.0);
    let gib = f64::from(1u32 << 30);
    if !args.json {
        println!(
            "{} pieces of {} MiB ({:.2} GiB), links {} Mbit/s, source {} Mbit/s, {} source pull(s), \
             per peer {}, total {}, {} upload slots, {:?} sharing, rarity over {:?} peers{}, {} ms a request, seed {}{}",
            args.pieces,
            args.piece_mib,
            size / gib,
            args.link_mbps,
            source * 8.0 / 1e6,
            args.source_pulls,
            limits.per_peer,
            limits.total,
            args.upload_slots,
            args.sharing,
            args.rarity_over,
            if args.super_seed { ", super-seeding pullers" } else { "" },
            args.request_ms,
            args.seed,
            args.dead.map_or(String::new(), |d| format!(", {} nodes die at {} s", d.nodes, d.at_s)),
        );
        if args.rack_nodes > 0 {
            println!(
                "racks of {} nodes, each linked to the core at {} Mbit/s each way; one node a rack fetches from other racks: {}",
                args.rack_nodes,
                uplink * 8.0 / 1e6,
                args.near
            );
        }
        println!("one node from the source: {one_node_s:.2} s");
        println!();
        println!(
            "| nodes | p2p: last (s) | p2p: mean (s) | p2p / one node | source: last (s) | source / one node \
             | source GiB per node, p2p | source GiB per node, all from source | puller uploads (pieces) |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for &n in &args.nodes {
        let wall = Instant::now();
        let cfg = Config {
            nodes: n,
            pieces: args.pieces,
            piece_bytes,
            link,
            source,
            pulls: args.source_pulls.min(n),
            limits,
            upload_slots: args.upload_slots,
            sharing: args.sharing,
            rarity: args.rarity_over,
            super_seed: args.super_seed,
            dead: args.dead,
            seed: args.seed,
            request_s: args.request_ms / 1000.0,
            rack_nodes: args.rack_nodes,
            uplink,
            near: args.near,
        };
        let p2p = Sim::new(cfg).run();
        let all = Sim::new(Config { pulls: n, dead: None, super_seed: false, ..cfg }).run();
        let wall_s = wall.elapsed().as_secs_f64();
        if args.json {
            let line = json!({
                "nodes": n,
                "pieces": args.pieces,
                "piece_bytes": piece_bytes,
                "link_bytes_per_s": link,
                "source_bytes_per_s": source,
                "pulls": cfg.pulls,
                "per_peer": limits.per_peer,
                "total": limits.total,
                "upload_slots": args.upload_slots,
                "sharing": format!("{:?}", args.sharing),
                "rarity_over": format!("{:?}", args.rarity_over),
                "super_seed": args.super_seed,
                "request_ms": args.request_ms,
                "rack_nodes": args.rack_nodes,
                "uplink_bytes_per_s": uplink,
                "near": args.near,
                "one_node_s": one_node_s,
                "p2p": outcome_json(&p2p, one_node_s),
                "source": outcome_json(&all, one_node_s),
                "wall_s": wall_s,
            });
            println!("{}", serde_json::to_string(&line).context("json")?);
        } else {
            println!(
                "| {n} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.4} | {:.3} | {} |",
                p2p.last_s,
                p2p.mean_s,
                p2p.last_s / one_node_s,
                all.last_s,
                all.last_s / one_node_s,
                p2p.source_bytes / p2p.live.max(1) as f64 / gib,
                all.source_bytes / n as f64 / gib,
                p2p.puller_uploads,
            );
            if p2p.finished < p2p.live || all.finished < all.live {
                println!(
                    "  unfinished: p2p {} of {}, all from source {} of {}",
                    p2p.live - p2p.finished,
                    p2p.live,
                    all.live - all.finished,
                    all.live
                );
            }
            if p2p.failed > 0 {
                println!("  {} transfers failed when nodes died", p2p.failed);
            }
            if args.rack_nodes > 0 {
                let racks = n.div_ceil(args.rack_nodes) as f64;
                println!(
                    "  into racks over their core links: p2p {:.2} GiB ({:.2} per rack), all from source {:.2} GiB",
                    p2p.cross_rack_bytes / gib,
                    p2p.cross_rack_bytes / racks / gib,
                    all.cross_rack_bytes / gib
                );
            }
        }
    }
    Ok(())
}

fn outcome_json(o: &Outcome, one_node_s: f64) -> serde_json::Value {
    let last = o.last_s.is_finite().then_some(o.last_s);
    json!({
        "last_s": last,
        "mean_s": o.mean_s,
        "ratio": last.map(|l| l / one_node_s),
        "finished": o.finished,
        "live": o.live,
        "source_bytes": o.source_bytes,
        "source_bytes_per_node": o.source_bytes / o.live.max(1) as f64,
        "peer_bytes": o.peer_bytes,
        "puller_uploads": o.puller_uploads,
        "failed_transfers": o.failed,
        "cross_rack_bytes": o.cross_rack_bytes,
        "events": o.events,
    })
}
