//! Different submitters' jobs run as different Unix users by default (issue
//! 14, finding 9), on a TLS loopback cluster with real tokens, real processes
//! and real accounts: bob's rank can neither read alice's rank's secret
//! environment nor kill it. And the accounts the agent makes for submitters:
//! made once however many jobs ask at once, locked, never an account someone
//! else made, never root.
//!
//! Needs root (the agent makes users), as CI and this repository's machines run the tests.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use cohort_agent::submitter_account::{AccountError, SubmitterAccounts};
use cohort_proto::{JobFile, JobState, SubmitJobRequest};
use cohort_runtime::tls::Role;
use cohort_tests::{Cluster, NodeSpec, state};

/// Removes a Unix user and its group, trying again while another test holds the passwd lock.
fn remove_user(name: &str) {
    for _ in 0..50 {
        let out = Command::new("userdel").arg(name).output().expect("userdel (package passwd) is needed");
        // 0: removed; 6: no such user.
        if matches!(out.status.code(), Some(0 | 6)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot remove user {name}");
}

fn uid_of(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name).unwrap().map(|u| u.uid.as_raw())
}

/// The real uid of a process, from /proc/<pid>/status.
fn process_uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_submitters_jobs_run_as_two_users_that_cannot_read_or_kill_each_other() {
    assert!(cohort_tests::is_root(), "this test makes users: run it as root (as CI does)");
    let (alice_account, bob_account) = ("cohort-t9-alice", "cohort-t9-bob");
    remove_user(alice_account);
    remove_user(bob_account);
    let mut node = NodeSpec::loopback(0, 1);
    node.extra_args =
        ["--submitter-account-prefix", "cohort-t9-", "--submitter-uids", "62900-62999"].map(String::from).to_vec();
    let cluster = Cluster::start(vec![node]).await.unwrap();
    let tls = cluster.tls.as_ref().unwrap();
    let submit = |user: &'static str, yaml: String| {
        let url = cluster.url.clone();
        let token = tls.token(Role::Submit, user);
        async move {
            let mut client = tls.client(&url, Some(&token)).await.unwrap();
            let file = JobFile { yaml, source_name: format!("{user}.yaml"), ..JobFile::default() };
            let answer = client.submit_job(SubmitJobRequest { file: Some(file), ..Default::default() }).await;
            answer.unwrap().into_inner().job.unwrap()
        }
    };
    let out = tempfile::tempdir().unwrap();
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o777)).unwrap();

    // alice's job, with a secret, and no `user:`.
    let victim = submit(
        "alice",
        "name: alices\nkind: command\nnodes: 1\ngpus_per_node: 0\nstop_grace: 1s\n\
         env:\n  ALICE_TOKEN: {value: alice-hf-s3cret, secret: true}\ncommand: [sleep, '120']\n"
            .into(),
    )
    .await;
    let victim_pid = cluster.rank_of(&victim.id).await;
    let alice_uid = uid_of(alice_account).expect("the agent made alice's account");
    assert_eq!(process_uid(victim_pid), alice_uid, "alice's rank runs as her own account");
    let environ = std::fs::read(format!("/proc/{victim_pid}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("alice-hf-s3cret"), "the secret is there to be stolen");

    // bob's job, no `user:` either: reads alice's environment and kills her rank.
    let attack = format!(
        "id -u > {o}/uid; cat /proc/{victim_pid}/environ > {o}/environ 2> {o}/environ.err; \
         kill -9 {victim_pid} 2> {o}/kill.err; echo $? > {o}/kill.rc; true",
        o = out.path().display()
    );
    let attacker = submit(
        "bob",
        format!("name: bobs\nkind: command\nnodes: 1\ngpus_per_node: 0\ncommand: [sh, -c, {attack:?}]\n"),
    )
    .await;
    let attacker = cluster.wait_finished(&attacker.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&attacker), JobState::Succeeded, "{}", attacker.reason);

    let read = |name: &str| std::fs::read_to_string(out.path().join(name)).unwrap_or_default();
    let bob_uid = uid_of(bob_account).expect("the agent made bob's account");
    assert_ne!(bob_uid, alice_uid);
    assert_eq!(read("uid").trim(), bob_uid.to_string(), "bob's rank runs as his own account");
    assert!(!read("environ").contains("alice-hf-s3cret"), "bob read alice's secret: {}", read("environ"));
    assert_ne!(read("kill.rc").trim(), "0", "bob's kill of alice's rank succeeded");
    assert!(read("kill.err").contains("not permitted"), "kill must fail with EPERM: {}", read("kill.err"));

    // alice's job runs on, untouched.
    assert_eq!(process_uid(victim_pid), alice_uid, "alice's rank {victim_pid} is gone");
    let victim_now = cluster.job(&victim.id).await.unwrap();
    assert_eq!(state(&victim_now), JobState::Running, "{}", victim_now.reason);
    assert_eq!(victim_now.file.as_ref().unwrap().default_user, "submitter:alice");
    // The job's record, and `cohort status`, say which Unix user it runs as.
    assert_eq!(victim_now.processes[0].user, alice_account);
    let status = cluster.cli(&["status", &victim.id]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(&format!("runs as:   {alice_account}")), "{status}");
    cluster.cli(&["cancel", &victim.id]);
    cluster.wait_finished(&victim.id, Duration::from_secs(30)).await.unwrap();
    drop(cluster);
    remove_user(alice_account);
    remove_user(bob_account);
}

fn accounts(prefix: &str, uids: std::ops::RangeInclusive<u32>, homes: &std::path::Path) -> SubmitterAccounts {
    SubmitterAccounts { prefix: prefix.into(), uids, home_root: homes.to_owned(), ..SubmitterAccounts::default() }
}

#[test]
fn a_submitters_account_is_made_once_locked_and_without_login_however_many_ask_at_once() {
    assert!(cohort_tests::is_root(), "this test makes users: run it as root (as CI does)");
    let name = "cohort-t8-carol";
    remove_user(name);
    let homes = tempfile::tempdir().unwrap();
    let accounts = accounts("cohort-t8-", 62800..=62849, homes.path());
    let made: Vec<Result<nix::unistd::User, AccountError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4).map(|_| s.spawn(|| accounts.resolve("carol"))).collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let uids: Vec<u32> = made.into_iter().map(|r| r.unwrap().uid.as_raw()).collect();
    assert!(uids.iter().all(|&u| u == uids[0]), "one account for every job: {uids:?}");
    assert!((62800..=62849).contains(&uids[0]), "uid {} from the range", uids[0]);
    // Asked again later (the next job): the same account, nothing made.
    assert_eq!(accounts.resolve("carol").unwrap().uid.as_raw(), uids[0]);
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    assert_eq!(passwd.lines().filter(|l| l.starts_with(&format!("{name}:"))).count(), 1, "one passwd entry");
    let entry = passwd.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap();
    assert!(entry.ends_with("nologin") || entry.ends_with("/bin/false"), "no login shell: {entry}");
    assert!(entry.contains("cohort submitter carol"), "the comment names the submitter: {entry}");
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let password = shadow.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap().split(':').nth(1).unwrap();
    assert!(password.starts_with('!') || password.starts_with('*'), "no usable password: {password:?}");
    let home = std::fs::metadata(homes.path().join(name)).unwrap();
    assert_eq!((home.uid(), home.mode() & 0o777), (uids[0], 0o700), "a home of its own, private");
    remove_user(name);
}

#[test]
fn an_account_someone_else_made_is_never_used_and_root_never_is() {
    assert!(cohort_tests::is_root(), "this test makes users: run it as root (as CI does)");
    let homes = tempfile::tempdir().unwrap();
    let accounts = accounts("cohort-t7-", 62850..=62899, homes.path());
    // An account of the same name that cohort did not make for "dave".
    cohort_tests::system_user("cohort-t7-dave");
    let err = accounts.resolve("dave").unwrap_err();
    assert!(matches!(&err, AccountError::NotOurs { name, .. } if name == "cohort-t7-dave"), "{err}");
    assert!(err.to_string().contains("was not made by cohort for submitter \"dave\""), "{err}");
    remove_user("cohort-t7-dave");

    // Mapping submitters to existing users never maps to root or a system user.
    let mapping = SubmitterAccounts { map_existing: true, ..accounts.clone() };
    remove_user("cohort-t7-root");
    let root = mapping.resolve("root").unwrap();
    assert_eq!(root.name, "cohort-t7-root");
    assert!((62850..=62899).contains(&root.uid.as_raw()), "uid {}", root.uid);
    // A name that is not a Unix name as it is: refused, not altered.
    assert!(matches!(mapping.resolve("Root"), Err(AccountError::BadName { .. })));
    remove_user("cohort-t7-root");

    // An ordinary login user (uid 1000 and up, an LDAP site's) of the submitter's name:
    // used when the node maps submitters to users, never otherwise.
    let eve = "t7eve";
    remove_user(eve);
    remove_user("cohort-t7-t7eve");
    let out = Command::new("useradd").args(["--no-create-home", "--shell", "/usr/sbin/nologin", eve]).output().unwrap();
    assert!(out.status.success(), "useradd {eve}: {}", String::from_utf8_lossy(&out.stderr));
    let eve_uid = uid_of(eve).unwrap();
    assert!(eve_uid >= 1000, "useradd gave a login user uid {eve_uid}");
    assert_eq!(mapping.resolve(eve).unwrap().uid.as_raw(), eve_uid);
    let own = accounts.resolve(eve).unwrap();
    assert_eq!(own.name, "cohort-t7-t7eve");
    assert_ne!(own.uid.as_raw(), eve_uid);
    remove_user(eve);
    remove_user("cohort-t7-t7eve");
}
