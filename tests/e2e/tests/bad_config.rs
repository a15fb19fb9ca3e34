//! (c) A bad config exits 64 and names each bad key, for `check-config` and for `run`.

use std::process::Command;

use selfheal_e2e::bin;

const BAD: &str = r#"
[target]
pid = 1
command = "also set"
colour = "blue"

[admin]
listen = "not an address"

[monitor]
interval_ms = "soon"
cpu_threshold_percent = -5.0

[[platforms]]
name = "tackle.io"
path_prefixes = ["api/v1/tackle"]
"#;

#[test]
fn a_bad_config_exits_64_and_names_every_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BAD).expect("write");
    for args in [
        vec!["check-config".as_ref(), path.as_os_str()],
        vec!["run".as_ref(), "--config".as_ref(), path.as_os_str()],
    ] {
        let output = Command::new(bin("selfheal"))
            .args(&args)
            .output()
            .expect("run selfheal");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        // Keys that do not parse and values that make no sense, all in one report.
        for key in [
            "target.colour:",
            "monitor.interval_ms:",
            "target:",
            "admin.listen:",
            "monitor.cpu_threshold_percent:",
            "platforms[0].path_prefixes:",
        ] {
            assert!(stderr.contains(key), "{args:?} should name {key}: {stderr}");
        }
    }
    // A usage error is 64 too.
    let output = Command::new(bin("selfheal"))
        .arg("frobnicate")
        .output()
        .expect("run selfheal");
    assert_eq!(output.status.code(), Some(64));
    let output = Command::new(bin("selfheal"))
        .arg("--version")
        .output()
        .expect("run selfheal");
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("selfheal "));
}
