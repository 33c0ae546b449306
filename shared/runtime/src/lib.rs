//! What Cohort's processes share at run time, as opposed to the pure domain
//! of `cohort-shared`: TLS and tokens, tracing (with OTLP export), systemd
//! notify, daemon config files and the shutdown signal.
#![forbid(unsafe_code)]

pub mod config_file;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// An error with its causes, "transport error: ... invalid peer certificate:
/// UnknownIssuer": the top-level messages of tonic and reqwest are terse, the
/// reason is further down.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut cause = error.source();
    while let Some(e) = cause {
        // A layer that repeats the words just said ("tcp connect error: tcp connect error") says them once.
        let said = e.to_string();
        if !said.is_empty() && said != last {
            text.push_str(": ");
            text.push_str(&said);
            last = said;
        }
        cause = e.source();
    }
    text
}

/// A daemon's or tool's exit: the error as one line on stderr (`error: ...:
/// cause`), never a backtrace, whatever `RUST_BACKTRACE` says; exit status 1.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    fn chain(words: &[&'static str]) -> Layer {
        words.iter().rev().fold(None, |inner, w| Some(Layer(w, inner.map(Box::new)))).expect("one layer at least")
    }

    #[test]
    fn a_repeated_layer_is_said_once_and_a_short_cause_is_kept() {
        let refused = chain(&["transport error", "tcp connect error", "tcp connect error", "Connection refused"]);
        assert_eq!(super::error_chain(&refused), "transport error: tcp connect error: Connection refused");
        // Words that merely occur earlier are still a cause of their own.
        assert_eq!(super::error_chain(&chain(&["connection error", "error"])), "connection error: error");
    }
}
