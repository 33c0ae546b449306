//! The fault schedule: exponential gaps (a Poisson process) in simulated
//! time, each fault's kind drawn from a published mix, all from one seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a fault does to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// kill -9 of one rank: a GPU/XID fault or a software bug that kills the process.
    RankCrash,
    /// kill -9 of an agent and of its ranks: the host is gone (power, kernel, maintenance).
    NodeCrash,
    /// The agent's connections to the controller cut (a switch or cable); healed later.
    Partition,
    /// SIGSTOP of one rank: the others wait in the collective, as under an NCCL hang.
    Hang,
    /// The checkpoint file system filled by something else: the next save fails
    /// with ENOSPC (and every save after it, until an operator frees space).
    DiskFull,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::RankCrash => "rank crash",
            FaultKind::NodeCrash => "node crash",
            FaultKind::Partition => "partition",
            FaultKind::Hang => "hang",
            FaultKind::DiskFull => "full disk",
        }
    }
}

/// The mix, from Meta's Llama 3 paper (Dubey et al. 2024, Table 5: 419 unexpected
/// interruptions in 54 days on 16,384 H100s): GPU faults (faulty GPU 30.1 %, HBM3
/// 17.2 %, SRAM 4.5 %, system processor 4.1 %, thermal 1.4 %, SDC 1.4 %: 58.7 %)
/// and software bugs (12.9 %) end a rank: 70 %. Host maintenance (7.6 %), SSD,
/// power, chassis, IO expansion (2.7 %) and NIC (1.7 %) lose a host: 12 %.
/// Network switch and cable (8.4 %): a partition, 8 %. NCCL watchdog timeouts
/// (1.7 %), dependencies and other software that stall rather than crash: the
/// remaining 10 % as hangs (rounded up, so that a short run sees some).
pub const LLAMA3_MIX: [(FaultKind, f64); 4] =
    [(FaultKind::RankCrash, 0.70), (FaultKind::NodeCrash, 0.12), (FaultKind::Partition, 0.08), (FaultKind::Hang, 0.10)];

/// The seeded source of fault gaps, kinds and victims.
pub struct Schedule {
    rng: ChaCha8Rng,
    /// A second stream for the full disks, so that adding them leaves the
    /// mix's faults of a seed where they were.
    disk_rng: ChaCha8Rng,
    mtbf_s: f64,
}

impl Schedule {
    /// Faults every `mtbf_s` simulated seconds on average.
    pub fn new(seed: u64, mtbf_s: f64) -> Schedule {
        Schedule {
            rng: ChaCha8Rng::seed_from_u64(seed),
            disk_rng: ChaCha8Rng::seed_from_u64(seed ^ 0xd15c_f011),
            mtbf_s,
        }
    }

    /// The mix has no full disk (the Llama 3 table lists SSD faults, which
    /// lose the host, not a full file system), so full disks come on top of
    /// it: `n` of them, each once the job reaches a step drawn uniformly
    /// from those that a later save follows (`first..last`), in order.
    pub fn disk_full_steps(&mut self, n: usize, first: u64, last: u64) -> Vec<u64> {
        let mut steps: Vec<u64> =
            (0..n).map(|_| if first < last { self.disk_rng.random_range(first..last) } else { first }).collect();
        steps.sort_unstable();
        steps
    }

    /// Simulated seconds to the next fault (exponential, mean `mtbf_s`).
    pub fn gap_s(&mut self) -> f64 {
        let u: f64 = self.rng.random();
        -self.mtbf_s * (1.0 - u).ln()
    }

    pub fn kind(&mut self) -> FaultKind {
        let mut u: f64 = self.rng.random();
        for (kind, share) in LLAMA3_MIX {
            if u < share {
                return kind;
            }
            u -= share;
        }
        FaultKind::RankCrash
    }

    /// Which of `n` victims (node rank) the fault hits.
    pub fn victim(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n.max(1))
    }
}
