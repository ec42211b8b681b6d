//! The HTTP endpoint (hyper 1): `GET /metrics` (Prometheus text), `GET /health` (JSON, 503 when
//! failed), `GET /status` (the same with each target's rows, rows/s, errors and lag) and `GET /`,
//! a self-refreshing status page built from `/status` (no external assets; counts only, never a
//! value).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;

fn respond(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// The status page.
const PAGE: &str = include_str!("page.html");

/// Sums of a metric's series by their `target` label.
fn by_target(metrics: &Metrics, name: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for family in metrics.registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let Some(target) = m.get_label().iter().find(|l| l.name() == "target") else {
                continue;
            };
            let v = match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            };
            *out.entry(target.value().to_string()).or_insert(0.0) += v;
        }
    }
    out
}

/// Rows/s per target between two `/status` reads at least a second apart.
#[derive(Default)]
struct Rates {
    last: Option<(Instant, HashMap<String, f64>)>,
    rates: HashMap<String, f64>,
}

/// `/status`: `/health`'s body with each target's rows applied, rows/s, errors and lag.
fn status(metrics: &Metrics, health: &Health, rates: &Mutex<Rates>) -> serde_json::Value {
    let (_, mut body) = health.report();
    let rows = by_target(metrics, crate::metrics::ROWS_APPLIED_TOTAL);
    let errors = by_target(metrics, crate::metrics::ERRORS_TOTAL);
    let lag = by_target(metrics, crate::metrics::TARGET_LAG_SECONDS);
    let mut r = rates.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let due = match &r.last {
        Some((at, _)) => now.duration_since(*at).as_secs_f64() >= 1.0,
        None => true,
    };
    if due {
        if let Some((at, before)) = &r.last {
            let dt = now.duration_since(*at).as_secs_f64();
            let fresh = rows
                .iter()
                .map(|(t, v)| {
                    (
                        t.clone(),
                        (v - before.get(t).copied().unwrap_or(0.0)).max(0.0) / dt,
                    )
                })
                .collect();
            r.rates = fresh;
        }
        r.last = Some((now, rows.clone()));
    }
    if let Some(targets) = body["targets"].as_object_mut() {
        for (name, t) in targets.iter_mut() {
            t["rows_applied"] = serde_json::json!(rows.get(name).copied().unwrap_or(0.0) as u64);
            t["rows_per_sec"] =
                serde_json::json!(r.rates.get(name).copied().unwrap_or(0.0).round());
            t["errors"] = serde_json::json!(errors.get(name).copied().unwrap_or(0.0) as u64);
            t["lag_seconds"] = serde_json::json!(lag.get(name).copied().unwrap_or(0.0));
        }
    }
    body
}

fn handle(
    req: &Request<Incoming>,
    metrics: &Metrics,
    health: &Health,
    rates: &Mutex<Rates>,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return respond(405, "text/plain", "method not allowed\n".into());
    }
    match req.uri().path() {
        "/metrics" => respond(200, "text/plain; version=0.0.4", metrics.render()),
        "/health" => {
            let (code, body) = health.report();
            respond(code, "application/json", format!("{body}\n"))
        }
        "/status" => respond(
            200,
            "application/json",
            format!("{}\n", status(metrics, health, rates)),
        ),
        "/" => respond(200, "text/html; charset=utf-8", PAGE.to_string()),
        _ => respond(404, "text/plain", "not found\n".into()),
    }
}

/// Binds the listener (so a bad address fails start-up) and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /health, /status and the status page at /");
    let rates = Arc::new(Mutex::new(Rates::default()));
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(_) => continue,
                },
            };
            let (metrics, health, rates) = (metrics.clone(), health.clone(), rates.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = handle(&req, &metrics, &health, &rates);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}
