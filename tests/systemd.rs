//! The shipped systemd units pass `systemd-analyze verify` (where systemd is installed), with
//! the binary this build made in place of the installed one.

fn verify(unit_file: &str, unit_to_check: &str) {
    let Ok(which) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze not installed: skipped");
        return;
    };
    assert!(which.status.success());
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("systemd")
            .join(unit_file),
    )
    .unwrap()
    .replace("/usr/local/bin/pgcarve", env!("CARGO_BIN_EXE_pgcarve"));
    std::fs::write(dir.path().join(unit_file), text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join(unit_to_check))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{unit_to_check}: {said}"
    );
}

#[test]
fn the_unit_verifies() {
    verify("pgcarve.service", "pgcarve.service");
}

#[test]
fn the_template_unit_verifies_for_an_instance() {
    verify("pgcarve@.service", "pgcarve@billing.service");
}
