//! Peer-to-peer staging's piece selection (issue 18): which piece (one file
//! of a directory's manifest) a node fetches next, and from which peer.
//!
//! Rarest first: of the pieces the node still lacks, it asks for the one the
//! fewest usable peers hold. The pieces then spread evenly: a piece few nodes
//! hold is copied before a common one, so every node soon holds pieces its
//! peers want, and every node's upload stays busy instead of all requests
//! converging on the few nodes (at first only the source's puller) that hold
//! the same popular pieces. With pieces asked in manifest order instead, every
//! node would want the same next piece, and only the nodes already holding it
//! could serve. Rarest first also keeps a piece that only one peer holds
//! alive elsewhere before that peer leaves or dies.
//!
//! What `cohort-fanout` (the simulator that drives [`choose`]) found is in
//! the docs, "Fan-out simulation (issue 18)": with a source as fast as one
//! link, the node reading it must relay every piece once at exactly the rate
//! it reads them, so every piece it uploads twice, and every moment its upload
//! waits on a receiver that downloads too much at once, delays every node.
//!
//! [`choose`] is pure: the same views and the same random numbers give the same
//! choice. The caller supplies the randomness (ties are broken with it), so the
//! agent can seed it from anything and a simulator can replay it.

/// How many uploads (pieces served to peers) a node serves at once. A request
/// beyond it is refused; the requester then counts that peer as not usable for
/// a short while.
pub const UPLOAD_SLOTS: u32 = 2;

/// One piece's state at the node choosing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mine {
    /// Here and verified.
    Have,
    /// Being fetched now.
    InFlight,
    /// Neither: to be fetched.
    Missing,
}

/// What the choosing node knows of one peer.
#[derive(Debug, Clone, Copy)]
pub struct PeerView<'a> {
    /// Per piece, whether the peer offers it (a slice shorter than the pieces:
    /// the ones beyond it are not offered).
    pub has: &'a [bool],
    /// The choosing node's requests to this peer now.
    pub in_flight: u32,
    /// False: the peer refused or failed a request recently, or is dead. An
    /// unusable peer is neither asked nor counted as a holder.
    pub usable: bool,
}

/// How many requests a node keeps going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent requests to one peer.
    pub per_peer: u32,
    /// Concurrent downloads in all.
    pub total: u32,
}

impl Limits {
    /// One request per peer, eight downloads at once. Measured with real
    /// agents (`cohort-p2p-bench`, 8 nodes fetching 128 MiB over 50 Mbit/s
    /// uploads; benchmarks.md): 2 at once left the fetchers' uploads idle
    /// half the time (1.79x one node's time), 4 gave 1.34x, 8 1.17-1.26x
    /// (with downloads limited too: 1.99x, 1.32x, 1.26x). A
    /// node's downloads each wait on a request, a refusal or a peer's
    /// announcement now and then; with more of them one always moves. The
    /// simulator, which has no such waits, favoured 2 (a seed's upload sat
    /// partly idle with 4 there).
    pub const DEFAULT: Limits = Limits { per_peer: 1, total: 8 };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The next download, `(piece, peer)` as indices into `mine` and `peers`, or
/// None: as many pieces in flight as `limits.total` allows already, or no
/// missing piece held by a usable peer below `limits.per_peer` requests.
///
/// Of the missing pieces some usable peer below `limits.per_peer` holds, the
/// rarest (held by the fewest usable peers, all of them counted); then, of
/// those peers that hold it and may be asked, the one with the fewest of our
/// requests. A tie, of pieces or of peers, is broken by one call to `random`
/// (the tied one at `random() % ties`, in index order); without a tie it is
/// not called. O(pieces × peers).
pub fn choose(
    mine: &[Mine],
    peers: &[PeerView<'_>],
    limits: Limits,
    random: &mut impl FnMut() -> u64,
) -> Option<(usize, usize)> {
    let in_flight = mine.iter().filter(|m| **m == Mine::InFlight).count();
    if in_flight as u64 >= u64::from(limits.total) {
        return None;
    }
    let open = |peer: &PeerView<'_>| peer.usable && peer.in_flight < limits.per_peer;
    if !peers.iter().any(open) {
        return None;
    }
    // Per piece: usable peers holding it, and whether one of them may be asked.
    // (Plain index loops: this is the hot loop, and a simulator runs it unoptimised.)
    let mut holders = vec![0u32; mine.len()];
    let mut askable = vec![false; mine.len()];
    for peer in peers {
        if !peer.usable {
            continue;
        }
        let asked = open(peer);
        let has = &peer.has[..peer.has.len().min(mine.len())];
        for piece in 0..has.len() {
            if has[piece] {
                holders[piece] += 1;
                askable[piece] |= asked;
            }
        }
    }
    let candidates = || (0..mine.len()).filter(|&i| mine[i] == Mine::Missing && askable[i]);
    let fewest = candidates().map(|i| holders[i]).min()?;
    let rarest: Vec<usize> = candidates().filter(|&i| holders[i] == fewest).collect();
    let piece = pick(&rarest, random)?;
    let servers = || peers.iter().enumerate().filter(|(_, p)| open(p) && p.has.get(piece) == Some(&true));
    let least = servers().map(|(_, p)| p.in_flight).min()?;
    let least: Vec<usize> = servers().filter(|(_, p)| p.in_flight == least).map(|(i, _)| i).collect();
    Some((piece, pick(&least, random)?))
}

/// One of `tied`, at random (no call for one).
fn pick(tied: &[usize], random: &mut impl FnMut() -> u64) -> Option<usize> {
    match tied {
        [] => None,
        [one] => Some(*one),
        _ => tied.get((random() % tied.len() as u64) as usize).copied(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use Mine::{Have, InFlight, Missing};

    fn view(has: &[bool]) -> PeerView<'_> {
        PeerView { has, in_flight: 0, usable: true }
    }

    /// A random source that always answers `n`.
    fn fixed(n: u64) -> impl FnMut() -> u64 {
        move || n
    }

    /// A seeded xorshift64.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    const T: bool = true;
    const F: bool = false;

    #[test]
    fn the_rarest_missing_piece_comes_first() {
        let mine = [Missing; 3];
        // Piece 0 held by 3 peers, piece 1 by 1, piece 2 by 2.
        let (a, b, c) = ([T, T, T], [T, F, T], [T, F, F]);
        let peers = [view(&a), view(&b), view(&c)];
        for n in 0..8 {
            assert_eq!(choose(&mine, &peers, Limits::DEFAULT, &mut fixed(n)), Some((1, 0)));
        }
    }

    #[test]
    fn rarity_counts_only_usable_peers() {
        let mine = [Missing; 2];
        // Piece 0 held by 2 peers, one unusable; piece 1 by 2 usable ones.
        let (a, b, c) = ([T, T], [T, F], [F, T]);
        let peers = [view(&a), PeerView { usable: false, ..view(&b) }, view(&c)];
        assert_eq!(choose(&mine, &peers, Limits::DEFAULT, &mut fixed(0)), Some((0, 0)));
    }

    #[test]
    fn never_a_piece_had_or_in_flight() {
        let mine = [Have, InFlight, Missing, Have];
        let all = [T; 4];
        let peers = [view(&all), view(&all)];
        let mut random = xorshift(7);
        for _ in 0..50 {
            let (piece, _) = choose(&mine, &peers, Limits::DEFAULT, &mut random).unwrap();
            assert_eq!(piece, 2);
        }
        // Only pieces had or in flight left: nothing to fetch.
        let mine = [Have, InFlight, InFlight, Have];
        assert_eq!(choose(&mine, &peers, Limits::DEFAULT, &mut random), None);
    }

    #[test]
    fn the_total_limit_stops_new_downloads() {
        let all = [T; 6];
        let peers = [view(&all), view(&all), view(&all)];
        let mine = [InFlight, InFlight, Missing, Missing, Missing, Missing];
        let limits = Limits { per_peer: 4, total: 2 };
        assert_eq!(choose(&mine, &peers, limits, &mut fixed(0)), None);
        let limits = Limits { per_peer: 4, total: 3 };
        assert!(choose(&mine, &peers, limits, &mut fixed(0)).is_some());
        assert_eq!(choose(&mine, &peers, Limits { per_peer: 1, total: 0 }, &mut fixed(0)), None);
    }

    #[test]
    fn a_peer_at_its_per_peer_limit_is_not_asked_but_still_counts_for_rarity() {
        let mine = [Missing; 2];
        let (busy, other) = ([T, T], [F, T]);
        let peers = [PeerView { in_flight: 1, ..view(&busy) }, view(&other)];
        // Piece 0: only the busy peer holds it; piece 1 is held by both.
        for n in 0..4 {
            assert_eq!(choose(&mine, &peers, Limits::DEFAULT, &mut fixed(n)), Some((1, 1)));
        }
        // Two requests per peer: piece 0 (one holder) from the busy peer.
        let limits = Limits { per_peer: 2, total: 4 };
        assert_eq!(choose(&mine, &peers, limits, &mut fixed(0)), Some((0, 0)));
    }

    #[test]
    fn the_least_asked_holder_serves() {
        let mine = [Missing];
        let has = [T];
        let peers = [PeerView { in_flight: 2, ..view(&has) }, PeerView { in_flight: 1, ..view(&has) }, view(&has)];
        let limits = Limits { per_peer: 3, total: 8 };
        for n in 0..4 {
            assert_eq!(choose(&mine, &peers, limits, &mut fixed(n)), Some((0, 2)));
        }
    }

    #[test]
    fn unusable_peers_are_never_asked() {
        let mine = [Missing; 2];
        let (a, b) = ([T, T], [T, T]);
        let peers = [PeerView { usable: false, ..view(&a) }, view(&b)];
        let mut random = xorshift(3);
        for _ in 0..50 {
            assert_eq!(choose(&mine, &peers, Limits::DEFAULT, &mut random).unwrap().1, 1);
        }
    }

    #[test]
    fn nothing_to_fetch_is_none() {
        let mine = [Missing; 3];
        let (none, short, rest) = ([F, F, F], [T], [T, T, T]);
        // No peers; peers without the pieces; a short `has` (pieces beyond it not offered).
        assert_eq!(choose(&mine, &[], Limits::DEFAULT, &mut fixed(0)), None);
        assert_eq!(choose(&mine, &[view(&none)], Limits::DEFAULT, &mut fixed(0)), None);
        assert_eq!(choose(&mine, &[view(&short)], Limits::DEFAULT, &mut fixed(5)), Some((0, 0)));
        // The holders unusable, or at the per-peer limit.
        let peers = [PeerView { usable: false, ..view(&rest) }, PeerView { in_flight: 1, ..view(&rest) }];
        assert_eq!(choose(&mine, &peers, Limits::DEFAULT, &mut fixed(0)), None);
        assert_eq!(choose(&[Have, Have, InFlight], &[view(&rest)], Limits::DEFAULT, &mut fixed(0)), None);
        assert_eq!(choose(&[], &[view(&rest)], Limits::DEFAULT, &mut fixed(0)), None);
    }

    #[test]
    fn the_same_random_numbers_give_the_same_choices() {
        let mine = [Missing, Missing, Have, Missing, Missing, InFlight, Missing, Missing];
        let has: Vec<Vec<bool>> = (0..6).map(|p| (0..8).map(|i| (i + p) % 3 != 0).collect()).collect();
        let peers: Vec<PeerView<'_>> = has.iter().map(|h| view(h)).collect();
        let run = |seed| {
            let mut random = xorshift(seed);
            (0..20).map(|_| choose(&mine, &peers, Limits::DEFAULT, &mut random)).collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert!(run(11).iter().all(Option::is_some));
    }

    #[test]
    fn random_is_called_only_for_a_tie() {
        let mine = [Missing; 2];
        // Piece 0 has one holder: no tie of pieces, nor of peers.
        let (a, b) = ([T, T], [F, T]);
        let mut calls = 0;
        let choice = choose(&mine, &[view(&a), view(&b)], Limits::DEFAULT, &mut || {
            calls += 1;
            0
        });
        assert_eq!((choice, calls), (Some((0, 0)), 0));
    }

    #[test]
    fn ties_spread_with_the_random_numbers() {
        // Four pieces, each held by two of four peers.
        let mine = [Missing; 4];
        let has = [[T, T, F, F], [T, T, F, F], [F, F, T, T], [F, F, T, T]];
        let peers: Vec<PeerView<'_>> = has.iter().map(|h| view(h)).collect();
        let mut pieces = [0u32; 4];
        let mut servers = [0u32; 4];
        let mut random = xorshift(1);
        for _ in 0..4000 {
            let (piece, peer) = choose(&mine, &peers, Limits::DEFAULT, &mut random).unwrap();
            assert!(has[peer][piece]);
            pieces[piece] += 1;
            servers[peer] += 1;
        }
        for count in pieces.iter().chain(&servers) {
            assert!((800..1200).contains(count), "pieces {pieces:?}, peers {servers:?}");
        }
        // And different numbers, different choices.
        assert_ne!(
            choose(&mine, &peers, Limits::DEFAULT, &mut fixed(0)),
            choose(&mine, &peers, Limits::DEFAULT, &mut fixed(1))
        );
    }
}
