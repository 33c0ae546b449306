//! The controller's HTTP listener (`--http`): `/healthz`, Prometheus `/metrics`,
//! a small JSON API and the web page that draws on it. Read-only: everything
//! that changes the cluster goes through the gRPC API.

mod progress_metrics;
mod prometheus;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::controller::Controller;
use crate::error::ControllerError;
use crate::leading::Leading;
use crate::store::StoreHealth;

/// The page at `/`: one self-contained file, no external assets.
const INDEX_HTML: &str = include_str!("index.html");
/// Longer than this for the controller's state task to answer means something holds it stuck.
const STUCK_AFTER: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct HttpApi {
    /// The local `Controller` while this process leads; a standby has none.
    pub leading: Arc<Leading>,
}

/// What this process is, for `/healthz` and the page.
struct Role {
    name: &'static str,
    leader_url: String,
}

impl HttpApi {
    fn role(&self) -> Role {
        let state = self.leading.state();
        Role { name: if state.is_leader { "leader" } else { "standby" }, leader_url: state.leader_url }
    }

    /// The local controller, or 503 naming the leader.
    async fn controller(&self) -> Result<Arc<Controller>, Response> {
        if let Some(c) = self.leading.controller().await {
            return Ok(c);
        }
        let role = self.role();
        let body = serde_json::json!({
            "controller": { "id": self.leading.id, "role": role.name, "leader_url": role.leader_url },
            "error": format!("controller {} does not lead; ask the leader ({})", self.leading.id,
                if role.leader_url.is_empty() { "none known yet" } else { role.leader_url.as_str() }),
        });
        Err((StatusCode::SERVICE_UNAVAILABLE, json(&body)).into_response())
    }
}

pub fn router(api: HttpApi) -> Router {
    router_with(api, None)
}

/// With a token key, the data routes need a reading token (`/` and `/healthz` stay open).
fn router_with(api: HttpApi, key: Option<Arc<cohort_runtime::tls::TokenKey>>) -> Router {
    let data = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/cluster", get(cluster))
        .route("/api/jobs/{id}/metrics", get(job_metrics));
    let data = match key {
        Some(key) => data.route_layer(axum::middleware::from_fn_with_state(key, crate::security::http::require_reader)),
        None => data,
    };
    Router::new().route("/", get(index)).route("/healthz", get(healthz)).merge(data).with_state(api)
}

/// Serves the routes on `listener` until `shutdown` fires: over HTTPS with
/// tokens when `tls` is given, else plaintext and open (`--insecure`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: HttpApi,
    tls: Option<(rustls::ServerConfig, Arc<cohort_runtime::tls::TokenKey>)>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    match tls {
        None => axum::serve(listener, router(api)).with_graceful_shutdown(stop).await,
        Some((config, key)) => {
            let listener = crate::security::http::TlsListener::new(listener, config)?;
            axum::serve(listener, router_with(api, Some(key))).with_graceful_shutdown(stop).await
        }
    }
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// 200 "ok <role> <id>", followed by a "warning: " line for each record the
/// load quarantined; 503 while a new leader loads its state (naming why, when
/// a load failed), while the store cannot write (naming the error and the data
/// dir), or when the leader's state task does not answer (a command is stuck
/// on it, or it is flooded).
#[tracing::instrument(level = "debug", skip_all)]
async fn healthz(State(api): State<HttpApi>) -> Response {
    let role = api.role();
    let id = &api.leading.id;
    if role.name == "leader"
        && let Some(failure) = api.leading.load_failure()
    {
        let body = format!("failing: leader {id} cannot load the state (retrying): {failure}\n");
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    let Some(controller) = api.leading.controller().await else {
        if role.name == "leader" {
            let body = format!("starting: leader {id} is loading the state\n");
            return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        }
        let leader = if role.leader_url.is_empty() { "none known yet" } else { role.leader_url.as_str() };
        return (StatusCode::OK, format!("ok {} {id} (leader: {leader})\n", role.name)).into_response();
    };
    if let StoreHealth::Failing(why) = controller.store_health() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("failing: {} {id}: {why}\n", role.name)).into_response();
    }
    match tokio::time::timeout(STUCK_AFTER, controller.list(true)).await {
        Ok(_) => {
            let warnings: String = controller.load_warnings.iter().map(|w| format!("warning: {w}\n")).collect();
            (StatusCode::OK, format!("ok {} {id}\n{warnings}", role.name)).into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stuck: {} {id}: the controller's state task did not answer within {STUCK_AFTER:?}\n", role.name),
        )
            .into_response(),
    }
}

/// OpenMetrics text for scrapers that ask for it, else Prometheus text 0.0.4
/// (the same lines: every metric is a gauge).
#[tracing::instrument(level = "debug", skip_all)]
async fn metrics(State(api): State<HttpApi>, headers: HeaderMap) -> Response {
    // A standby exports only its role, so that summing over controllers counts each node once.
    let controller = api.leading.controller().await;
    let (nodes, jobs, queues) = match &controller {
        Some(c) => (c.nodes().await, c.list(false).await, c.list_queues().await.queues),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        prometheus::render(&api.leading.id, controller.is_some(), &nodes, &jobs, &queues),
    )
        .into_response()
}

/// Nodes (GPUs, telemetry, health) and jobs (state, attempts, progress) in the
/// protos' JSON mapping; bulky fields the page does not show are left out.
#[tracing::instrument(level = "debug", skip_all)]
async fn cluster(State(api): State<HttpApi>) -> Response {
    let controller = match api.controller().await {
        Ok(c) => c,
        Err(standby) => return standby,
    };
    let nodes: Vec<_> = controller
        .nodes()
        .await
        .into_iter()
        .map(|mut n| {
            n.preflight = None;
            n
        })
        .collect();
    let jobs: Vec<_> = controller
        .list(false)
        .await
        .into_iter()
        .map(|mut j| {
            crate::secrets::redact_job(&mut j);
            j.file = None;
            j.preflight = None;
            j.datasets.iter_mut().for_each(|d| d.report.clear());
            for a in j.plan.iter_mut().flat_map(|p| p.nodes.iter_mut()) {
                a.processes.clear();
            }
            j
        })
        .collect();
    json(&serde_json::json!({
        "controller": { "id": api.leading.id, "role": api.role().name },
        "nodes": nodes,
        "jobs": jobs,
    }))
}

#[derive(Deserialize)]
struct MetricsQuery {
    /// Skip the job's first `from` points (the page fetches only new ones).
    #[serde(default)]
    from: usize,
}

/// The job's training points, oldest first, as a JSON array.
#[tracing::instrument(level = "debug", skip_all, fields(job = %id))]
async fn job_metrics(State(api): State<HttpApi>, Path(id): Path<String>, Query(q): Query<MetricsQuery>) -> Response {
    let controller = match api.controller().await {
        Ok(c) => c,
        Err(standby) => return standby,
    };
    let job = match controller.get(&id).await {
        Ok(job) => job,
        Err(ControllerError::JobNotFound(_)) => {
            return (StatusCode::NOT_FOUND, format!("no job {id:?}\n")).into_response();
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let (points, _) = controller.metrics.snapshot(&job.id, q.from).await;
    tracing::debug!(points = points.len(), "job metrics served");
    json(&points)
}

fn json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode JSON: {e}\n")).into_response(),
    }
}
