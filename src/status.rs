//! `pgcarve status`: a one-screen summary of a running pgcarve, read from its `GET /status`
//! (at `metrics.listen`). Counts and states only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// Reads `/status` from a pgcarve listening at `addr`.
pub fn fetch(addr: SocketAddr) -> Result<Value, String> {
    let timeout = Duration::from_secs(5);
    let mut conn = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("no pgcarve answers at {addr} (metrics.listen): {e}"))?;
    conn.set_read_timeout(Some(timeout)).ok();
    conn.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    serde_json::from_str(body).map_err(|e| format!("{addr}: /status is not JSON: {e}"))
}

fn secs(v: &Value) -> String {
    v.as_f64().map_or("–".into(), |s| format!("{s:.1} s"))
}

/// The summary a person reads.
pub fn summary(s: &Value) -> String {
    let mut out = format!(
        "pgcarve {}: phase {}, lag {}, confirmed {}, stream {}\n",
        s["status"].as_str().unwrap_or("?"),
        s["phase"].as_str().unwrap_or("?"),
        secs(&s["lag_seconds"]),
        s["confirmed_lsn"].as_str().unwrap_or("?"),
        if s["source_connected"].as_bool() == Some(true) {
            "up"
        } else {
            "down"
        }
    );
    for p in s["problems"].as_array().into_iter().flatten() {
        out.push_str(&format!("problem: {}\n", p.as_str().unwrap_or("")));
    }
    if let Some(f) = s["fatal"].as_str() {
        out.push_str(&format!("fatal: {f}\n"));
    }
    out.push_str(&format!(
        "{:<16} {:<12} {:>9} {:>9} {:>13} {:>7}\n",
        "target", "state", "lag", "rows/s", "rows applied", "errors"
    ));
    for (name, t) in s["targets"].as_object().into_iter().flatten() {
        let mut state = t["state"].as_str().unwrap_or("?").to_string();
        if t["detached"].as_bool() == Some(true) {
            state.push_str(" (detached)");
        }
        out.push_str(&format!(
            "{:<16} {:<12} {:>9} {:>9} {:>13} {:>7}\n",
            name,
            state,
            secs(&t["lag_seconds"]),
            t["rows_per_sec"].as_f64().unwrap_or(0.0),
            t["rows_applied"].as_u64().unwrap_or(0),
            t["errors"].as_u64().unwrap_or(0),
        ));
    }
    let copy = s["copy"].as_array().cloned().unwrap_or_default();
    if !copy.is_empty() {
        let done = copy.iter().filter(|c| c["state"] == "copied").count();
        out.push_str(&format!(
            "initial copy: {done}/{} tables copied\n",
            copy.len()
        ));
        for c in copy.iter().filter(|c| c["state"] != "copied") {
            out.push_str(&format!(
                "  {:<30} {:<8} {} of ~{} rows\n",
                c["table"].as_str().unwrap_or("?"),
                c["state"].as_str().unwrap_or("?"),
                c["rows"].as_u64().unwrap_or(0),
                c["estimate"].as_u64().unwrap_or(0)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_shows_states_counts_and_the_copy() {
        let s = serde_json::json!({
            "status": "degraded", "phase": "streaming", "lag_seconds": 1.25,
            "confirmed_lsn": "0/16B3748", "source_connected": true, "problems": [], "fatal": null,
            "targets": {"billing": {"state": "retrying", "detached": false, "lag_seconds": 4.0,
                                     "rows_per_sec": 12.0, "rows_applied": 900, "errors": 3}},
            "copy": [{"table": "public.claims", "state": "copying", "rows": 10, "estimate": 100},
                     {"table": "public.payments", "state": "copied", "rows": 5, "estimate": 5}]
        });
        let text = summary(&s);
        assert!(
            text.starts_with("pgcarve degraded: phase streaming, lag 1.2 s"),
            "{text}"
        );
        assert!(text.contains("billing          retrying"), "{text}");
        assert!(text.contains("initial copy: 1/2 tables copied"));
        assert!(text.contains("public.claims"));
        assert!(!text.contains("public.payments"));
    }
}
