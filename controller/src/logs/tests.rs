#![allow(clippy::unwrap_used)]
use super::*;

fn line(text: &str) -> LogLine {
    LogLine { process_index: 1, stream: LogStream::Stderr as i32, text: text.into(), unix_ms: 7, dropped_bytes: 0 }
}

/// Everything a reader opened now streams from `from`, chunk by chunk.
async fn read_from(hub: &LogHub, job: &str, from: u64) -> Vec<JobLogLine> {
    let reader = hub.reader(job).await;
    let mut offset = from;
    let mut lines = Vec::new();
    while offset < reader.end {
        let (mut chunk, next) = reader.chunk(offset, reader.end).await;
        lines.append(&mut chunk);
        offset = next;
    }
    lines
}

fn texts(lines: &[JobLogLine]) -> Vec<&str> {
    lines.iter().map(|l| l.line.as_ref().unwrap().text.as_str()).collect()
}

#[tokio::test]
async fn lines_survive_a_restart_and_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let hub = LogHub::new(dir.path().into()).unwrap();
        hub.append("j-1", "n1", 0, 1, vec![line("a\tb"), line("c")]).await;
    }
    let hub = LogHub::new(dir.path().into()).unwrap();
    hub.append("j-1", "n2", 1, 1, vec![line("d")]).await;
    let lines = read_from(&hub, "j-1", 0).await;
    assert_eq!(texts(&lines), ["a\tb", "c", "d"]);
    assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(lines[2].node_name, "n2");
    assert_eq!(lines[0].line.as_ref().unwrap().stream, LogStream::Stderr as i32);
}

#[tokio::test]
async fn a_replaced_attempt_stays_replaced_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let hub = LogHub::new(dir.path().into()).unwrap();
        hub.append("j", "n1", 0, 1, vec![line("live, also in the file")]).await;
        hub.append("j", "n1", 0, 0, vec![line("older attempt")]).await;
        hub.replace_attempt(
            "j",
            1,
            vec![("n1".into(), 0, line("from the file")), ("n1".into(), 0, line("live, also in the file"))],
        )
        .await;
        hub.append("j", "n1", 0, 1, vec![line("after")]).await;
    }
    let hub = LogHub::new(dir.path().into()).unwrap();
    let lines = read_from(&hub, "j", 0).await;
    assert_eq!(texts(&lines), ["older attempt", "from the file", "live, also in the file", "after"]);
}

#[tokio::test]
async fn a_gap_record_and_a_newline_in_a_line_come_back_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let hub = LogHub::new(dir.path().into()).unwrap();
    let mut gap = line("[cohort: 5 bytes of output dropped]");
    gap.dropped_bytes = 5;
    hub.append("j", "n1", 0, 1, vec![gap, line("two\nlines")]).await;
    let lines = read_from(&hub, "j", 0).await;
    assert_eq!(lines.len(), 2, "a newline in a line must not make a second record");
    assert_eq!(lines[0].line.as_ref().unwrap().dropped_bytes, 5);
    assert_eq!(lines[0].line.as_ref().unwrap().stream, LogStream::Stderr as i32);
    assert_eq!(lines[1].line.as_ref().unwrap().dropped_bytes, 0);
    assert_eq!(texts(&lines)[1], "two\u{2424}lines");
}

#[tokio::test]
async fn the_tail_of_one_node_is_found_from_the_end_with_lines_longer_than_a_block() {
    let dir = tempfile::tempdir().unwrap();
    let hub = LogHub::new(dir.path().into()).unwrap();
    let long = "x".repeat(100 * 1024);
    for i in 0..50 {
        let node = if i % 2 == 0 { "even" } else { "odd" };
        hub.append("j", node, 0, 1, vec![line(&format!("{i} {long}"))]).await;
    }
    let reader = hub.reader("j").await;
    let start = reader.tail_start(3, |l| l.node_name == "odd").await;
    let lines: Vec<JobLogLine> =
        read_from(&hub, "j", start).await.into_iter().filter(|l| l.node_name == "odd").collect();
    let firsts: Vec<&str> = texts(&lines).iter().map(|t| t.split(' ').next().unwrap()).collect();
    assert_eq!(firsts, ["45", "47", "49"]);
    // More than there are: from the start.
    assert_eq!(reader.tail_start(1000, |_| true).await, 0);
}

#[tokio::test]
async fn a_record_cut_short_by_a_crash_does_not_swallow_the_next() {
    let dir = tempfile::tempdir().unwrap();
    {
        let hub = LogHub::new(dir.path().into()).unwrap();
        hub.append("j", "n1", 0, 1, vec![line("whole")]).await;
    }
    let mut file = std::fs::OpenOptions::new().append(true).open(dir.path().join("j.log")).unwrap();
    file.write_all(b"1\t1\t0\tn1\t1\terr\t7\tcut sh").unwrap();
    let hub = LogHub::new(dir.path().into()).unwrap();
    // A reader before any append sees only complete records.
    assert_eq!(texts(&read_from(&hub, "j", 0).await), ["whole"]);
    hub.append("j", "n1", 0, 1, vec![line("next")]).await;
    let lines = read_from(&hub, "j", 0).await;
    assert_eq!(texts(&lines), ["whole", "cut sh", "next"]);
    assert_eq!(lines[2].seq, 2);
}

/// Finding 10: memory per job must not grow with its output, and goes when the job is done.
#[tokio::test]
async fn memory_per_job_does_not_grow_with_its_output_and_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let hub = LogHub::new(dir.path().into()).unwrap();
    hub.append("job-1", "n1", 0, 1, vec![line("first")]).await;
    let after_one_line = hub.resident_bytes().await;
    let text = "y".repeat(1024);
    for _ in 0..200 {
        hub.append("job-1", "n1", 0, 1, (0..100).map(|_| line(&text)).collect()).await;
    }
    let after_20_mb = hub.resident_bytes().await;
    assert_eq!(after_one_line, after_20_mb, "20 MB of output changed what the hub keeps in memory");
    assert!(after_20_mb < 512, "{after_20_mb} bytes kept for one job");
    let mut follower = hub.reader("job-1").await;
    hub.append("job-1", "n1", 0, 1, vec![line(&text)]).await;
    let woken = follower.appended.recv().await.unwrap();
    assert_eq!(woken.end, hub.end("job-1").await, "a follower is told where the file ends, not sent the line");

    hub.retain(|id| id != "job-1").await;
    assert_eq!(hub.resident_bytes().await, 0);
    // The file stays: a later reader finds every line.
    assert_eq!(read_from(&hub, "job-1", 0).await.len(), 20_002);
}
