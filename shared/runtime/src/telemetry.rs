//! Tracing setup shared by the daemons and the CLI.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Installs a `fmt` subscriber filtered by `RUST_LOG` (default: `default_filter`).
/// Logs go to stderr so that a CLI's stdout stays machine-readable.
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_target(false)
        .try_init();
}

/// Colour codes only for a person at a terminal: never into a log file or
/// the journal, and never with `NO_COLOR` set (<https://no-color.org>).
pub fn colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP endpoint {endpoint}: cannot build the span exporter: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("a tracing subscriber is already installed in this process")]
    AlreadyInstalled,
    #[error("OTLP span export did not finish cleanly: {0}")]
    Shutdown(String),
}

/// Keeps the OTLP pipeline alive; `shutdown` (or drop) exports what is still queued.
#[must_use = "dropping the guard shuts the OTLP exporter down"]
pub struct OtelGuard {
    provider: Option<SdkTracerProvider>,
}

impl OtelGuard {
    /// Whether spans are exported (an endpoint was given).
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes queued spans to the collector and stops the exporter. Blocks: call it
    /// from `spawn_blocking` (or outside the runtime) on a multi-thread Tokio runtime,
    /// whose workers drive the gRPC channel.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        match self.provider.take() {
            Some(provider) => provider.shutdown().map_err(|e| TelemetryError::Shutdown(e.to_string())),
            None => Ok(()),
        }
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Like [`init`], and when `endpoint` is given (e.g. `http://collector:4317`) also
/// exports every span that passes the filter over OTLP/gRPC as `service_name`.
/// Must be called inside a Tokio runtime: the gRPC channel's worker runs on it.
pub fn init_with_otlp(
    default_filter: &str,
    service_name: &str,
    endpoint: Option<&str>,
) -> Result<OtelGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour()).with_target(false);
    let provider = match endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| TelemetryError::Exporter { endpoint: endpoint.to_string(), message: e.to_string() })?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_string()).build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        // The exporter's own gRPC stack must not feed spans back into it.
        let own =
            |target: &str| ["h2", "hyper", "tonic", "tower", "opentelemetry"].iter().any(|t| target.starts_with(t));
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("cohort"))
            .with_filter(tracing_subscriber::filter::filter_fn(move |meta| !own(meta.target())))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(OtelGuard { provider })
}
