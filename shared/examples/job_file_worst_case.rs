//! Parse time of hostile 1 MiB job files (issue 14, finding 3: 200 KB of nested
//! `[` cost about a minute of controller CPU). Prints one line per shape:
//! `cargo run --release -p cohort-shared --example job_file_worst_case [KiB]`
//! (default 1024 KiB; the first argument picks another size).
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use cohort_shared::spec::JobSpec;

fn main() {
    let kib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let size = kib << 10;
    let head = "name: worst\nkind: command\nnodes: 1\ncommand: [x]\n";
    let fill = |unit: &str| unit.repeat((size - head.len() - 8) / unit.len());
    let shapes: Vec<(&str, String)> = vec![
        ("nested [", format!("{head}x: {}\n", fill("["))),
        ("nested {", format!("{head}x: {}\n", fill("{"))),
        ("nested [ closed", format!("{head}x: {}{}\n", "[".repeat(size / 4), "]".repeat(size / 4))),
        ("compact - - -", format!("{head}x:\n{}\n", fill("- "))),
        ("deep indentation", format!("{head}x:\n{}y: 1\n", fill(" "))),
        ("aliases", format!("{head}a: &a [1, 2, 3]\nb: [{}]\n", fill("*a, "))),
        ("many keys", format!("{head}env:\n{}", (0..size / 16).map(|i| format!("  K{i:07}: v\n")).collect::<String>())),
        ("one long scalar", format!("{head}x: {}\n", fill("a"))),
    ];
    for (name, text) in shapes {
        let started = Instant::now();
        let outcome = match JobSpec::from_yaml(&text, "worst.yaml") {
            Ok(_) => "accepted".to_owned(),
            Err(e) => e.issues.first().map(|i| i.message.chars().take(70).collect()).unwrap_or_default(),
        };
        println!(
            "{name:<18} {:>7} KiB {:>10.1} ms  {outcome}",
            text.len() / 1024,
            started.elapsed().as_secs_f64() * 1e3
        );
    }
}
