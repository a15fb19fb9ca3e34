//! Every config shipped in `config/` parses and validates.

use selfheal_daemon::config::{load, Env};

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(err) = load(&path, &Env::default()) {
                panic!("{}: {err}: {err:?}", path.display());
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "config/ should hold the demo, systemd and sidecar examples"
    );
}
