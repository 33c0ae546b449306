//! How the node's GPUs reach each other: NVLink pairs (direct, or through an
//! NVSwitch) and NVLink islands. Pure: the NVML backend scans links and hands
//! them here, the fake backend builds its islands here, and the planner's
//! tests get the same numbering either way.

use std::collections::{BTreeMap, BTreeSet};

use cohort_proto::{GpuInfo, GpuLink};

/// The `GpuLink.kind` of GPUs joined by NVLink.
pub const NVLINK: &str = "NVLINK";

/// One GPU's active NVLink links, as NVML reports them.
#[derive(Debug, Clone, Default)]
pub struct NvlinkScan {
    pub index: u32,
    pub pci_bus_id: String,
    /// The remote end's PCI bus id of each active link: a GPU, or an NVSwitch.
    pub remotes: Vec<String>,
}

/// Canonical form of a PCI bus id, so that "0000:18:00.0" and
/// "00000000:18:00.0" (NVML pads the domain to 8 digits) compare equal.
pub fn normalize_bus_id(id: &str) -> String {
    let id = id.trim().to_ascii_lowercase();
    let parse = || -> Option<String> {
        let (rest, function) = id.rsplit_once('.')?;
        let mut parts = rest.rsplitn(3, ':');
        let device = u32::from_str_radix(parts.next()?, 16).ok()?;
        let bus = u32::from_str_radix(parts.next()?, 16).ok()?;
        let domain = parts.next().map_or(Some(0), |d| u32::from_str_radix(d, 16).ok())?;
        let function = u32::from_str_radix(function, 16).ok()?;
        Some(format!("{domain:08x}:{bus:02x}:{device:02x}.{function:x}"))
    };
    parse().unwrap_or(id)
}

/// NVLink pairs `(a, b)` with `a < b` and their link count. Links whose remote
/// is a GPU count for that pair. Links to anything else are taken as NVSwitch
/// ports: GPUs that share a switch are joined with the smaller of their switch
/// link counts (what `nvidia-smi topo -m` shows as NV18 on HGX H100). Pairs in
/// `p2p_nvlink` (NVML's P2P status over NVLink is OK) that no link explains are
/// joined too, with the smaller active-link count (0 when links are unknown).
pub fn nvlink_pairs(scans: &[NvlinkScan], p2p_nvlink: &BTreeSet<(u32, u32)>) -> BTreeMap<(u32, u32), u32> {
    let by_bus: BTreeMap<String, u32> = scans.iter().map(|s| (normalize_bus_id(&s.pci_bus_id), s.index)).collect();
    let mut direct: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    let mut switches: BTreeMap<u32, BTreeMap<String, u32>> = BTreeMap::new();
    for scan in scans {
        let mut to_peer: BTreeMap<u32, u32> = BTreeMap::new();
        for remote in &scan.remotes {
            let remote = normalize_bus_id(remote);
            match by_bus.get(&remote) {
                Some(&peer) if peer != scan.index => *to_peer.entry(peer).or_default() += 1,
                Some(_) => {}
                None => *switches.entry(scan.index).or_default().entry(remote).or_default() += 1,
            }
        }
        // Each side counts the same links; keep the larger view if one side under-reports.
        for (peer, n) in to_peer {
            let key = ordered(scan.index, peer);
            let entry = direct.entry(key).or_default();
            *entry = (*entry).max(n);
        }
    }
    let switch_links = |i: u32| switches.get(&i).map_or(0, |m| m.values().sum::<u32>());
    let active = |i: u32| scans.iter().find(|s| s.index == i).map_or(0, |s| s.remotes.len() as u32);
    let mut pairs = direct;
    for (a, b) in all_pairs(scans.iter().map(|s| s.index)) {
        if pairs.contains_key(&(a, b)) {
            continue;
        }
        let shared = match (switches.get(&a), switches.get(&b)) {
            (Some(sa), Some(sb)) => sa.keys().any(|k| sb.contains_key(k)),
            _ => false,
        };
        if shared {
            pairs.insert((a, b), switch_links(a).min(switch_links(b)));
        } else if p2p_nvlink.contains(&(a, b)) {
            pairs.insert((a, b), active(a).min(active(b)));
        }
    }
    pairs
}

/// Island number of each GPU: connected components over `pairs` (union-find),
/// numbered 0, 1, ... in the order of each island's lowest GPU index. A GPU
/// without NVLink is an island of its own.
pub fn islands(indices: &[u32], pairs: impl IntoIterator<Item = (u32, u32)>) -> BTreeMap<u32, u32> {
    let sorted: Vec<u32> = indices.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
    let position: BTreeMap<u32, usize> = sorted.iter().enumerate().map(|(p, i)| (*i, p)).collect();
    let mut parent: Vec<usize> = (0..sorted.len()).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for (a, b) in pairs {
        if let (Some(&pa), Some(&pb)) = (position.get(&a), position.get(&b)) {
            let (ra, rb) = (root(&mut parent, pa), root(&mut parent, pb));
            // The smaller root wins, so each island's root is its lowest index.
            parent[ra.max(rb)] = ra.min(rb);
        }
    }
    let mut numbers: BTreeMap<usize, u32> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (p, index) in sorted.iter().enumerate() {
        let r = root(&mut parent, p);
        let next = numbers.len() as u32;
        out.insert(*index, *numbers.entry(r).or_insert(next));
    }
    out
}

/// Sets `nvlink_island` of each GPU from its NVLINK links to the other GPUs
/// of `gpus` (links to GPUs not in the list are ignored).
pub fn assign_islands(gpus: &mut [GpuInfo]) {
    let indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
    let pairs: Vec<(u32, u32)> = gpus
        .iter()
        .flat_map(|g| g.links.iter().filter(|l| l.kind == NVLINK).map(move |l| (g.index, l.peer_index)))
        .collect();
    let islands = islands(&indices, pairs);
    for gpu in gpus {
        gpu.nvlink_island = islands.get(&gpu.index).copied().unwrap_or_default();
    }
}

/// Fills `links` of each GPU: NVLINK for `nvlinks` pairs, else the PCIe kind
/// `pcie(a, b)` gives (None: unknown, no link listed). Then numbers the islands.
pub fn assemble(gpus: &mut [GpuInfo], nvlinks: &BTreeMap<(u32, u32), u32>, pcie: impl Fn(u32, u32) -> Option<String>) {
    let indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
    for gpu in gpus.iter_mut() {
        gpu.links = indices
            .iter()
            .filter(|&&peer| peer != gpu.index)
            .filter_map(|&peer| match nvlinks.get(&ordered(gpu.index, peer)) {
                Some(&n) => Some(GpuLink { peer_index: peer, kind: NVLINK.into(), nvlinks: n }),
                None => pcie(gpu.index, peer).map(|kind| GpuLink { peer_index: peer, kind, nvlinks: 0 }),
            })
            .collect();
    }
    assign_islands(gpus);
}

fn ordered(a: u32, b: u32) -> (u32, u32) {
    (a.min(b), a.max(b))
}

fn all_pairs(indices: impl Iterator<Item = u32>) -> Vec<(u32, u32)> {
    let sorted: Vec<u32> = indices.collect::<BTreeSet<_>>().into_iter().collect();
    let mut out = Vec::new();
    for (i, a) in sorted.iter().enumerate() {
        for b in &sorted[i + 1..] {
            out.push((*a, *b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus(i: u32) -> String {
        format!("00000000:{:02X}:00.0", 0x18 + i * 0x10)
    }

    #[test]
    fn bus_ids_normalize() {
        assert_eq!(normalize_bus_id("00000000:18:00.0"), "00000000:18:00.0");
        assert_eq!(normalize_bus_id("0000:18:00.0"), "00000000:18:00.0");
        assert_eq!(normalize_bus_id("0000:AB:00.0"), "00000000:ab:00.0");
        assert_eq!(normalize_bus_id("18:00.0"), "00000000:18:00.0");
        assert_eq!(normalize_bus_id("garbage"), "garbage");
    }

    #[test]
    fn eight_gpus_in_two_direct_islands() {
        // Each GPU has 6 links to each other GPU of its group of four.
        let scans: Vec<NvlinkScan> = (0..8)
            .map(|i| NvlinkScan {
                index: i,
                pci_bus_id: bus(i),
                remotes: (0..8).filter(|p| p / 4 == i / 4 && *p != i).flat_map(|p| vec![bus(p); 6]).collect(),
            })
            .collect();
        let pairs = nvlink_pairs(&scans, &BTreeSet::new());
        assert_eq!(pairs.len(), 12);
        assert_eq!(pairs[&(0, 3)], 6);
        assert!(!pairs.contains_key(&(3, 4)));
        let islands = islands(&(0..8).collect::<Vec<_>>(), pairs.keys().copied());
        assert_eq!(islands.values().copied().collect::<Vec<_>>(), [0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn gpus_on_one_nvswitch_form_one_island() {
        let switch = "00000000:05:00.0".to_string();
        let scans: Vec<NvlinkScan> =
            (0..8).map(|i| NvlinkScan { index: i, pci_bus_id: bus(i), remotes: vec![switch.clone(); 18] }).collect();
        let pairs = nvlink_pairs(&scans, &BTreeSet::new());
        assert_eq!(pairs.len(), 28);
        assert!(pairs.values().all(|n| *n == 18));
        let islands = islands(&(0..8).collect::<Vec<_>>(), pairs.keys().copied());
        assert!(islands.values().all(|i| *i == 0));
    }

    #[test]
    fn no_nvlink_means_one_island_per_gpu() {
        let scans: Vec<NvlinkScan> =
            (0..4).map(|i| NvlinkScan { index: i, pci_bus_id: bus(i), remotes: vec![] }).collect();
        let pairs = nvlink_pairs(&scans, &BTreeSet::new());
        assert!(pairs.is_empty());
        let mut gpus: Vec<GpuInfo> =
            (0..4).map(|i| GpuInfo { index: i, pci_bus_id: bus(i), ..GpuInfo::default() }).collect();
        assemble(&mut gpus, &pairs, |_, _| Some("NODE".into()));
        assert_eq!(gpus.iter().map(|g| g.nvlink_island).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(gpus.iter().all(|g| g.links.len() == 3 && g.links.iter().all(|l| l.kind == "NODE")));
    }

    #[test]
    fn p2p_status_joins_what_links_do_not_explain() {
        let scans: Vec<NvlinkScan> =
            (0..2).map(|i| NvlinkScan { index: i, pci_bus_id: bus(i), remotes: vec![] }).collect();
        let pairs = nvlink_pairs(&scans, &BTreeSet::from([(0, 1)]));
        assert_eq!(pairs.get(&(0, 1)), Some(&0));
    }

    #[test]
    fn islands_are_numbered_by_lowest_index_and_chain_transitively() {
        let islands = islands(&[7, 3, 5, 1, 0], [(7, 5), (3, 1)]);
        assert_eq!(islands, BTreeMap::from([(0, 0), (1, 1), (3, 1), (5, 2), (7, 2)]));
        let chain = super::islands(&[0, 1, 2, 3], [(0, 1), (2, 3), (1, 2)]);
        assert!(chain.values().all(|i| *i == 0));
    }

    #[test]
    fn assign_islands_ignores_links_to_gpus_not_listed() {
        let link = |peer| GpuLink { peer_index: peer, kind: NVLINK.into(), nvlinks: 4 };
        let mut gpus = vec![
            GpuInfo { index: 0, links: vec![link(1)], ..GpuInfo::default() },
            GpuInfo { index: 2, links: vec![link(1)], ..GpuInfo::default() },
        ];
        assign_islands(&mut gpus);
        assert_eq!(gpus.iter().map(|g| g.nvlink_island).collect::<Vec<_>>(), [0, 1]);
    }
}
