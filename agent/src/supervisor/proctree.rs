//! A launch's processes as /proc shows them: the shim's process group and
//! every descendant of the shim, whatever its group. torchrun starts its
//! workers with `start_new_session=True`, so they leave the shim's group;
//! the shim is a child subreaper, so they stay below it even when their
//! parent dies.

/// One process, from /proc/PID/stat and cmdline.
#[derive(Debug, Clone)]
pub(crate) struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub pgrp: u32,
    /// R, S, D, T, t, Z, ...
    pub state: char,
    pub comm: String,
    pub argv0: String,
}

/// Every process /proc lists (those that vanish while it is read are left out).
fn all() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = stat.get(open + 1..close)?.to_string();
            let mut rest = stat.get(close + 2..)?.split(' ');
            let state = rest.next()?.chars().next()?;
            let ppid: u32 = rest.next()?.parse().ok()?;
            let pgrp: u32 = rest.next()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
            Some(Proc { pid, ppid, pgrp, state, comm, argv0 })
        })
        .collect()
}

/// The live (not zombie) processes of a launch led by `shim`: the members
/// of its process group and all its descendants, `shim` itself included
/// when alive; sorted by pid.
pub(crate) fn launch_processes(shim: u32) -> Vec<Proc> {
    let procs = all();
    let mut children: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
    for p in &procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut wanted = std::collections::HashSet::new();
    let mut todo: Vec<u32> =
        std::iter::once(shim).chain(procs.iter().filter(|p| p.pgrp == shim).map(|p| p.pid)).collect();
    while let Some(pid) = todo.pop() {
        if wanted.insert(pid) {
            todo.extend(children.get(&pid).into_iter().flatten().copied());
        }
    }
    let mut out: Vec<Proc> = procs.into_iter().filter(|p| wanted.contains(&p.pid) && p.state != 'Z').collect();
    out.sort_by_key(|p| p.pid);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_descendant_in_a_session_of_its_own_belongs_to_the_launch() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("escaped.pid");
        // The leader's grandchild leaves the group with setsid, as torchrun's workers do.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", &format!("setsid sh -c 'echo $$ > {}; exec sleep 60' & wait", pidfile.display())])
            .process_group(0)
            .spawn()
            .unwrap();
        let group = leader.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let escaped: u32 = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok()) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the escapee never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        let procs = launch_processes(group);
        let escapee = procs.iter().find(|p| p.pid == escaped).expect("the setsid descendant is part of the launch");
        assert_ne!(escapee.pgrp, group, "it left the group");
        assert!(procs.iter().any(|p| p.pid == group));
        assert!(!launch_processes(group).iter().any(|p| p.pid == std::process::id()), "never the test itself");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(escaped as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = leader.wait();
    }
}
