//! The `cohort` CLI's own error messages, each triggered the way a user would
//! (issue 16, finding 6): the real binary, the exit code, the words of the
//! message, the flag or field it names and the fix it gives. Most fail before
//! any connection and need no cluster (the controller address given is a port
//! nothing listens on, and the message must not be "cannot reach"); the few
//! that need one share a TLS cluster and a plaintext controller.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use cohort_tests::{Cluster, NodeSpec, SparePort, bin};

/// What one run of `cohort` said.
struct Said {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Said {
    /// Asserts the exit code.
    fn exits(&self, code: i32) -> &Said {
        assert_eq!(self.code, Some(code), "{self}");
        self
    }

    /// Failed (exit 1) before any connection: the address given is never tried.
    fn offline(&self) -> &Said {
        self.exits(1);
        assert!(!self.stderr.contains("cannot reach a controller"), "it tried to connect:\n{self}");
        assert!(self.stdout.is_empty(), "{self}");
        self
    }

    fn stderr_contains(&self, piece: &str) -> &Said {
        assert!(self.stderr.contains(piece), "{piece:?} not on stderr:\n{self}");
        self
    }

    fn stdout_contains(&self, piece: &str) -> &Said {
        assert!(self.stdout.contains(piece), "{piece:?} not on stdout:\n{self}");
        self
    }
}

impl std::fmt::Display for Said {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\nstdout:\n{}\nstderr:\n{}", self.code, self.stdout, self.stderr)
    }
}

/// `cohort ARGS` with none of the caller's COHORT_* settings, plus `env`.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(bin("cohort"));
    for (key, _) in std::env::vars() {
        if key.starts_with("COHORT_") {
            command.env_remove(key);
        }
    }
    command.args(args).envs(env.iter().copied());
    command
}

fn said(command: &mut Command) -> Said {
    let out = command.output().unwrap();
    Said {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn cohort(args: &[&str]) -> Said {
    said(&mut command(args, &[]))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `127.0.0.1:PORT` where nothing listens, held for the test.
fn nothing_listens() -> (SparePort, String) {
    let port = SparePort::take();
    let addr = port.addr();
    (port, addr)
}

#[test]
fn a_job_file_that_cannot_be_read_is_named_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (_port, addr) = nothing_listens();
    let missing = tmp.path().join("missing.yaml");
    for verb in ["submit", "plan", "validate"] {
        let out = cohort(&[verb, path(&missing), "--controller", &addr, "--insecure"]);
        out.offline()
            .stderr_contains(&format!("error: cannot read job file {}: No such file or directory", missing.display()));
    }
    // A directory, a file that is not UTF-8 text.
    cohort(&["submit", path(tmp.path()), "--controller", &addr, "--insecure"])
        .offline()
        .stderr_contains(&format!("cannot read job file {}: Is a directory", tmp.path().display()));
    let binary = tmp.path().join("job.bin");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    cohort(&["plan", path(&binary), "--controller", &addr, "--insecure"])
        .offline()
        .stderr_contains(&format!("cannot read job file {}: stream did not contain valid UTF-8", binary.display()));
    // Larger than any job file: not even read whole (a sparse file).
    let huge = tmp.path().join("huge.yaml");
    std::fs::File::create(&huge).unwrap().set_len((64 << 20) + 1).unwrap();
    cohort(&["submit", path(&huge), "--controller", &addr, "--insecure"]).offline().stderr_contains(&format!(
        "job file {} is larger than 64 MiB; a job file is a short YAML text",
        huge.display()
    ));
}

#[test]
fn an_env_flag_without_equals_or_with_a_bad_name_is_refused_with_the_form_to_write() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("job.yaml");
    std::fs::write(&file, "name: a\nkind: command\ncommand: [true]\n").unwrap();
    // clap's usage error: exit 2, naming the flag.
    let out = cohort(&["submit", path(&file), "-e", "NCCL_DEBUG"]);
    out.exits(2)
        .stderr_contains("invalid value 'NCCL_DEBUG' for '--env <NAME=VALUE>'")
        .stderr_contains("\"NCCL_DEBUG\": write NAME=VALUE, e.g. NCCL_DEBUG=INFO");
    let out = cohort(&["run", "--env", "1X=2", "--", "true"]);
    out.exits(2)
        .stderr_contains("invalid value '1X=2' for '--env <NAME=VALUE>'")
        .stderr_contains("\"1X\" is not an environment variable name (letters, digits and _, not first a digit)");
    // `cohort run` without a command: clap says what is missing and the form.
    cohort(&["run", "-N", "2", "--"])
        .exits(2)
        .stderr_contains("required arguments were not provided")
        .stderr_contains("<COMMAND>")
        .stderr_contains("Usage: cohort run");
}

#[test]
fn overrides_on_a_file_they_cannot_change_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (_port, addr) = nothing_listens();
    let write = |name: &str, yaml: &str| {
        let file = tmp.path().join(name);
        std::fs::write(&file, yaml).unwrap();
        file.display().to_string()
    };
    let list = write("list.yaml", "- name: a\n- kind: command\n");
    cohort(&["submit", &list, "--nodes", "2", "--controller", &addr, "--insecure"])
        .offline()
        .stderr_contains(&format!("error: {list}: a job file is a mapping (`name: ...`, `kind: ...`)"));
    let broken = write("broken.yaml", "name: a\nkind: [command\n");
    cohort(&["submit", &broken, "--nodes", "2", "--name", "b", "--controller", &addr, "--insecure"])
        .offline()
        .stderr_contains(&format!("{broken}: not valid YAML, so --name b --nodes 2 cannot be applied"))
        .stderr_contains("line 3");
    let env_list = write("env.yaml", "name: a\nkind: command\nenv: [A]\ncommand: [true]\n");
    cohort(&["submit", &env_list, "-e", "A=1", "--controller", &addr, "--insecure"])
        .offline()
        .stderr_contains("`env` in the job file is not a mapping (NAME: value lines), so --env cannot add to it");
}

#[test]
fn a_controller_address_that_cannot_work_names_the_flag_and_the_fix() {
    let (_port, addr) = nothing_listens();
    // Plaintext without --insecure: refused, with the TLS spelling of the same address.
    cohort(&["jobs", "--controller", &format!("http://{addr}")]).offline().stderr_contains(&format!(
        "error: http://{addr}: plaintext http:// needs --insecure (and a controller started with --insecure); \
         use https://{addr} with --ca-cert"
    ));
    // Not an address at all.
    cohort(&["nodes", "--controller", "gpu head:7070", "--insecure"]).offline().stderr_contains(
        "error: --controller \"gpu head:7070\": not an address; give host:port or https://host:port \
         (comma-separated for several controllers)",
    );
    // TLS (the default) without the cluster CA, from the flag or the environment.
    for out in [
        cohort(&["jobs", "--controller", &addr]),
        said(&mut command(&["status", "j-1"], &[("COHORT_CONTROLLER", &addr)])),
    ] {
        out.offline().stderr_contains(&format!(
            "error: https://{addr}: TLS needs the cluster CA: pass --ca-cert (or COHORT_CA_CERT) \
             with the ca.crt of `cohort-controller init`"
        ));
    }
    // Nothing listening: every address tried is named, and where to set another.
    let out = cohort(&["jobs", "--controller", &format!("{addr}, {addr}"), "--insecure"]);
    out.exits(1)
        .stderr_contains(&format!("error: cannot reach a controller ({addr}: "))
        .stderr_contains("Connection refused")
        .stderr_contains("is cohort-controller running? (set --controller or COHORT_CONTROLLER)");
    assert_eq!(out.stderr.matches(&format!("{addr}: ")).count(), 2, "{out}");
}

#[test]
fn ca_cert_and_token_errors_name_the_file_and_come_before_any_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let (_port, addr) = nothing_listens();
    let missing = tmp.path().join("ca.crt");
    cohort(&["jobs", "--controller", &addr, "--ca-cert", path(&missing)])
        .offline()
        .stderr_contains(&format!(
            "error: --ca-cert {}: cannot read it (the ca.crt of `cohort-controller init`)",
            missing.display()
        ))
        .stderr_contains("No such file or directory");
    let not_pem = tmp.path().join("notes.txt");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    cohort(&["jobs", "--controller", &addr, "--ca-cert", path(&not_pem)])
        .offline()
        .stderr_contains(&format!(
            "--ca-cert {}: not the cluster CA (the PEM ca.crt of `cohort-controller init`)",
            not_pem.display()
        ))
        .stderr_contains("the CA file holds no certificate");

    // The token is read before connecting: its error, not "cannot reach", whatever the verb.
    let no_token = tmp.path().join("admin.token");
    for verb in [&["jobs"][..], &["token", "create", "--role", "view"]] {
        let mut args = verb.to_vec();
        args.extend(["--controller", &addr, "--insecure", "--token-file", path(&no_token)]);
        cohort(&args)
            .offline()
            .stderr_contains(&format!("error: --token-file {}: cannot read it", no_token.display()))
            .stderr_contains("a token of `cohort token create`, or the admin.token of `cohort-controller init`");
    }
    let empty = tmp.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    said(&mut command(&["jobs", "--insecure"], &[("COHORT_CONTROLLER", &addr), ("COHORT_TOKEN_FILE", path(&empty))]))
        .offline()
        .stderr_contains(&format!(
            "--token-file {}: the file is empty; write a token of `cohort token create` into it",
            empty.display()
        ));
    // A token a header cannot carry (a pasted line break inside it).
    cohort(&["jobs", "--controller", &addr, "--insecure", "--token", "eyJhbGc\niOiJ9"])
        .offline()
        .stderr_contains(
            "error: --token (or COHORT_TOKEN): not a token of `cohort token create` (paste it whole, on one line)",
        )
        .stderr_contains("a header cannot carry");
}

#[test]
fn bad_flag_values_fail_before_any_connection() {
    let (_port, addr) = nothing_listens();
    cohort(&["jobs", "--state", "running,done", "--controller", &addr, "--insecure"]).offline().stderr_contains(
        "error: --state \"done\": not a job state; one of pending, starting, running, succeeded, failed, cancelled",
    );
    for (flag, file, what) in [
        ("--out", "loss.jpg", "extension \"jpg\""),
        ("--out", "loss", "no extension"),
        ("-o", "curve.pdf", "extension \"pdf\""),
    ] {
        cohort(&["plot", "j-1", flag, file, "--controller", &addr, "--insecure"]).offline().stderr_contains(&format!(
            "error: --out {file}: {what}, not .png or .svg (the image format follows the extension: --out loss.png)"
        ));
    }
}

#[test]
fn validate_of_a_bad_file_exits_2_naming_the_line_and_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.yaml");
    std::fs::write(&good, "name: ok\nkind: command\nnodes: 2\ncommand: [true]\n").unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nkind: command\nnodes: two\ncommand: [true]\n").unwrap();
    let out = cohort(&["validate", path(&good), path(&bad)]);
    out.exits(2)
        .stderr_contains(&format!("{}:3: nodes: invalid type: string \"two\", expected a whole number", bad.display()))
        .stderr_contains("(the controller checks more at submit: users, secrets, limits; `cohort plan` asks it)");
    out.stdout_contains(&format!("{}: ok: command job \"ok\", 2 node(s)", good.display()));
    // A warning does not make a file invalid: it names the file and the field, and what to do.
    let relative_save = tmp.path().join("sft.yaml");
    std::fs::write(
        &relative_save,
        "name: sft\nkind: megatron-sft\nnodes: 2\ngpus_per_node: 1\nmegatron:\n  swift_version: 3\n  \
         load: /models/Qwen3-8B-mcore\n  dataset: [/data/train.jsonl]\n  finetune: true\n  micro_batch_size: 1\n  \
         global_batch_size: 2\n  save: out/run\n",
    )
    .unwrap();
    cohort(&["validate", path(&relative_save)])
        .exits(0)
        .stderr_contains(&format!("warning: {}: megatron.save: \"out/run\" is relative", relative_save.display()))
        .stderr_contains("give an absolute path, set `workdir:` to the shared directory it is under, or `sync:`");
    // Only good files: exit 0, no hint about the controller.
    let out = cohort(&["validate", path(&good)]);
    out.exits(0);
    assert!(!out.stderr.contains("`cohort plan` asks it"), "{out}");
}

/// A stand-in for a dev cluster's process: alive, with the directory in its
/// command line (what `cohort dev` checks a pid file against); killed on drop.
struct FakeProcess(Child);

impl FakeProcess {
    fn start(dir: &Path) -> FakeProcess {
        let child = Command::new("sh").args(["-c", "sleep 60; true"]).arg(dir).spawn().unwrap();
        // Until its exec the child has this test's command line: wait for the shell's.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read(&cmdline)
            .is_ok_and(|c| c.windows(dir.as_os_str().len()).any(|w| w == dir.as_os_str().as_encoded_bytes()))
        {
            assert!(std::time::Instant::now() < deadline, "sh never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        FakeProcess(child)
    }
}

impl Drop for FakeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dev_errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let d = path(&dir);

    // No cluster there: status fails saying how to start one; down has nothing to do.
    let none = dir.join("none");
    cohort(&["dev", "status", "--dir", path(&none)])
        .exits(1)
        .stdout_contains(&format!("no dev cluster in {} (`cohort dev up` starts one)", none.display()));
    cohort(&["dev", "down", "--dir", path(&none)])
        .exits(0)
        .stderr_contains(&format!("no dev cluster in {}", none.display()));

    cohort(&["dev", "up", "--nodes", "0", "--dir", d])
        .exits(1)
        .stderr_contains("error: --nodes 0: give 1 to 250 (one loopback address each, 127.0.0.2 up)");
    cohort(&["dev", "up", "--nodes", "251", "--dir", d]).exits(1).stderr_contains("error: --nodes 251: give 1 to 250");
    let refused = dir.join("refused");
    cohort(&["dev", "up", "--nodes", "0", "--dir", path(&refused)]).exits(1);
    assert!(!refused.exists(), "a refused `dev up` makes no directory");

    // A directory that cannot be made.
    let file = dir.join("file");
    std::fs::write(&file, "").unwrap();
    let under_file = file.join("dev");
    cohort(&["dev", "up", "--dir", path(&under_file)])
        .exits(1)
        .stderr_contains(&format!("error: --dir {}: cannot create it", under_file.display()))
        .stderr_contains("Not a directory");

    // Neither --dir nor a home to put the default in.
    let mut no_home = command(&["dev", "status"], &[]);
    no_home.env_remove("HOME").env_remove("XDG_STATE_HOME");
    said(&mut no_home).exits(1).stderr_contains("error: HOME is not set: pass --dir");

    // A state file that is not one: the way to start afresh names the directory.
    let state = dir.join("cluster.json");
    std::fs::write(&state, "{\"port\": \"x\"}").unwrap();
    for verb in ["up", "status"] {
        cohort(&["dev", verb, "--dir", d]).exits(1).stderr_contains(&format!(
            "error: {}: not a dev cluster's state; `cohort dev down --dir {d} --purge` starts afresh",
            state.display()
        ));
    }

    // `cohort-controller init` cannot write the CA: its own words, after whose they are.
    let blocked = dir.join("blocked");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("controller"), "").unwrap();
    cohort(&["dev", "up", "--dir", path(&blocked), "--port", "1"])
        .exits(1)
        .stderr_contains(&format!(
            "error: cohort-controller init failed: error: creating --tls-dir {}",
            blocked.join("controller/tls").display()
        ))
        .stderr_contains("Not a directory");

    // A CA without the rest of the TLS files: no join token can be made; start afresh.
    let half = dir.join("half");
    std::fs::create_dir_all(half.join("controller/tls")).unwrap();
    std::fs::write(half.join("controller/tls/ca.crt"), "").unwrap();
    cohort(&["dev", "up", "--dir", path(&half), "--port", "1"])
        .exits(1)
        .stderr_contains("error: cohort-controller token failed: ")
        .stderr_contains("token.key")
        .stderr_contains(&format!(
            "(the TLS files in {}/controller/tls are incomplete: `cohort dev down --dir {} --purge` starts afresh)",
            half.display(),
            half.display()
        ));

    // A state that cannot be read at all (a directory in its place).
    let unreadable = dir.join("unreadable");
    std::fs::create_dir_all(unreadable.join("cluster.json")).unwrap();
    cohort(&["dev", "status", "--dir", path(&unreadable)]).exits(1).stderr_contains(&format!(
        "error: {}/cluster.json: cannot read the dev cluster's state; `cohort dev down --dir {} --purge` starts afresh",
        unreadable.display(),
        unreadable.display()
    ));

    // A cluster of 2 nodes "runs" (pid files of a live process naming the directory).
    std::fs::write(&state, "{\"port\": 1, \"nodes\": 2, \"gpus_per_node\": 1}").unwrap();
    cohort(&["dev", "status", "--dir", d]).exits(1).stdout_contains(&format!(
        "node states unknown: the controller is not running (`cohort dev up --dir {d}` starts it)"
    ));
    let fake = FakeProcess::start(&dir);
    for name in ["controller", "node0", "node1"] {
        std::fs::write(dir.join(format!("{name}.pid")), fake.0.id().to_string()).unwrap();
    }
    // Another shape is refused, naming what runs and the way out; nothing is started or stopped.
    cohort(&["dev", "up", "--nodes", "3", "--dir", d]).exits(1).stderr_contains(&format!(
        "error: a dev cluster runs in {d} with 2 nodes, 1 GPU each, on port 1: \
         `cohort dev down --dir {d}` first to change it"
    ));
    // The same shape: it already runs, and the lines to paste come again.
    let out = cohort(&["dev", "up", "--dir", d]);
    out.exits(0).stderr_contains(&format!("a dev cluster already runs in {d} (2 nodes)"));
    assert!(out.stdout.starts_with("export COHORT_CONTROLLER=https://127.0.0.1:1 "), "{out}");
    drop(fake);
}

#[test]
fn dev_up_without_the_daemons_says_how_to_get_them() {
    // The cohort binary alone in a directory (a hard link: same file system
    // as the build), with an empty PATH: no cohort-controller anywhere.
    let alone = tempfile::tempdir_in(cohort_tests::bin_dir()).unwrap();
    let cohort_bin = alone.path().join("cohort");
    std::fs::hard_link(bin("cohort"), &cohort_bin).unwrap();
    let dev = alone.path().join("dev");
    let out = said(
        Command::new(&cohort_bin)
            .args(["dev", "up", "--dir", path(&dev)])
            .env("PATH", alone.path())
            .env_remove("COHORT_CONTROLLER"),
    );
    out.exits(1).stderr_contains(&format!(
        "error: cohort-controller is neither next to {} nor on PATH: \
         build it (`cargo build --workspace --bins`) or install it",
        cohort_bin.display()
    ));
}

#[test]
fn dev_up_with_a_daemon_that_cannot_run_names_its_path() {
    // Files named like the daemons next to the cohort binary, but not programs.
    let alone = tempfile::tempdir_in(cohort_tests::bin_dir()).unwrap();
    let cohort_bin = alone.path().join("cohort");
    std::fs::hard_link(bin("cohort"), &cohort_bin).unwrap();
    for name in ["cohort-controller", "cohort-agent"] {
        std::fs::write(alone.path().join(name), "not a program").unwrap();
    }
    let dev = alone.path().join("dev");
    said(Command::new(&cohort_bin).args(["dev", "up", "--dir", path(&dev)]).env_remove("COHORT_CONTROLLER"))
        .exits(1)
        .stderr_contains(&format!("error: running {} init: ", alone.path().join("cohort-controller").display()))
        .stderr_contains("Permission denied");
}

#[test]
fn local_failures_of_run_and_completion_say_what_failed() {
    // `cohort run` from a directory deleted under the shell.
    let tmp = tempfile::tempdir().unwrap();
    let gone = tmp.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let script = format!("cd '{}' && rmdir '{}' && exec \"$0\" run -- true", gone.display(), gone.display());
    said(Command::new("sh").args(["-c", &script]).arg(bin("cohort")).env_remove("COHORT_CONTROLLER"))
        .exits(1)
        .stderr_contains("error: cohort run: the current directory is gone (deleted?): cd into one that exists");
    // A completion script to a full disk.
    let full = std::fs::File::options().write(true).open("/dev/full").unwrap();
    said(command(&["completion", "bash"], &[]).stdout(full))
        .exits(1)
        .stderr_contains("error: writing the completion script to stdout: No space left on device");
}

/// Errors that need a controller to answer, against one TLS cluster of one
/// node and one plaintext controller.
#[tokio::test(flavor = "multi_thread")]
async fn errors_that_need_a_controller_name_the_job_node_or_flag_and_the_fix() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let run = |args: &[&str]| {
        let out = cluster.cli(args);
        Said {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };

    // An unknown job: the controller's words, with where to look.
    for verb in [&["status", "nope"][..], &["logs", "nope"], &["cancel", "nope"], &["plot", "nope", "--out", "x.svg"]] {
        run(verb).exits(1).stderr_contains("error: no job \"nope\": `cohort jobs` lists the known jobs");
    }

    let job =
        cluster.submit("name: quiet\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [true]\n").await.unwrap();
    cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    // Logs of a node the job has no rank on: said, rather than printing nothing.
    run(&["logs", &job.id, "--node", "node7"]).exits(1).stderr_contains(&format!(
        "error: --node node7: job {0} has no rank on node7; its nodes are node0 (`cohort status {0}` lists its ranks)",
        job.id
    ));
    let out = run(&["logs", &job.id, "--node", "node0"]);
    out.exits(0);
    // A plot of a job that logged no loss: no file, and where the loss comes from.
    let image = cluster.dir.path().join("loss.png");
    run(&["plot", &job.id, "--out", path(&image)])
        .exits(1)
        .stderr_contains(&format!("error: cannot plot job {}: no training point has a loss yet", job.id))
        .stderr_contains("`cohort metrics`")
        .stderr_contains("lm loss");
    assert!(!image.exists());

    // plan of a file the controller refuses: each problem on its line, exit 2.
    let file = cluster.dir.path().join("bad.yaml");
    std::fs::write(&file, "name: bad\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: []\n").unwrap();
    let out = run(&["plan", path(&file)]);
    out.exits(2)
        .stderr_contains(&format!("job file {}: 1 problem(s)", file.display()))
        .stderr_contains(&format!("{}:5: command", file.display()));

    // TLS against a controller started with --insecure: the hint says to pass --insecure.
    let plaintext = Cluster::start_with(Vec::new(), &["--insecure"]).await.unwrap();
    let plain_addr = plaintext.url.trim_start_matches("http://");
    let ca = cluster.tls.as_ref().unwrap().dir.join("ca.crt");
    cohort(&["jobs", "--controller", plain_addr, "--ca-cert", path(&ca)]).exits(1).stderr_contains(
        "hint: the controller answered without TLS: it was started with --insecure; \
         pass --insecure too (trusted networks only)",
    );
    let out = cohort(&["jobs", "--controller", plain_addr, "--insecure"]);
    out.exits(0);
}
