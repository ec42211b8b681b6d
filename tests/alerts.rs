//! What on-call sees: the shipped alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`: each alert fires on synthetic series and resolves); every metric a
//! rule or the dashboard names is one pgcarve exports; a target's series exist at zero from
//! start-up.

use std::path::Path;

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn promtool(args: &[&str]) -> Option<(bool, String)> {
    let out = std::process::Command::new("promtool")
        .args(args)
        .output()
        .ok()?;
    Some((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn the_rules_check_and_every_alert_fires_and_resolves_in_promtool() {
    let rules = deploy("prometheus-rules.yml");
    let Some((ok, out)) = promtool(&["check", "rules", rules.to_str().unwrap()]) else {
        // .ci/run installs Debian's prometheus package, which has promtool.
        eprintln!("promtool not installed: skipped (apt-get install prometheus)");
        return;
    };
    assert!(ok, "{out}");
    let tests = deploy("prometheus-rules.test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()]).unwrap();
    assert!(ok, "{out}");
    // Every alert in the rules has a unit test.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let tests_text = std::fs::read_to_string(&tests).unwrap();
    for line in rules_text.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests_text.contains(&format!("alertname: {name}")),
                "alert {name} has no promtool test"
            );
        }
    }
}

/// Metric names in a text: `migration_…` and `data_inconsistency_detected`.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    for start in [
        text.match_indices("migration_"),
        text.match_indices("data_inconsistency_detected"),
    ]
    .into_iter()
    .flatten()
    .map(|(i, _)| i)
    {
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if name != "migration_alerts" && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    let metrics = pgcarve::metrics::Metrics::new();
    metrics.init_target("billing", &["public.claims".to_string()]);
    metrics.copy_rows.with_label_values(&["public.claims"]);
    metrics
        .copy_rows_estimate
        .with_label_values(&["public.claims"]);
    metrics.copy_done.with_label_values(&["public.claims"]);
    metrics
        .ddl_problem
        .with_label_values(&["public.claims", "dropped"]);
    metrics
        .table_renamed
        .with_label_values(&["public.claims", "public.x"]);
    let text = metrics.render();
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for file in ["prometheus-rules.yml", "grafana-dashboard.json"] {
        let named = metric_names(&std::fs::read_to_string(deploy(file)).unwrap());
        assert!(!named.is_empty(), "{file} names no metric");
        for name in named {
            // A histogram's series carry suffixes.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                exported.contains(&name.as_str()) || exported.contains(&base),
                "{file} names {name}, which pgcarve does not export"
            );
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 5));
}

#[test]
fn a_targets_series_exist_at_zero_from_start_up() {
    let metrics = pgcarve::metrics::Metrics::new();
    metrics.init_target("billing", &["public.claims".to_string()]);
    let text = metrics.render();
    for series in [
        "migration_errors_total{sqlstate_class=\"23\",target=\"billing\"} 0",
        "migration_errors_total{sqlstate_class=\"divergence\",target=\"billing\"} 0",
        "migration_rows_applied_total{operation=\"insert\",table=\"public.claims\",target=\"billing\"} 0",
        "migration_transactions_applied_total{target=\"billing\"} 0",
        "migration_target_up{target=\"billing\"} 0",
        "migration_target_state{state=\"starting\",target=\"billing\"} 1",
        "migration_target_state{state=\"failed\",target=\"billing\"} 0",
        "migration_apply_batch_seconds_count{target=\"billing\"} 0",
        "migration_lag_bytes 0",
        "migration_copying 0",
        "data_inconsistency_detected 0",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    assert!(text.contains("migration_build_info{version=\""), "{text}");
}
