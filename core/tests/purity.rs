//! The core stays pure: no async runtime, no gRPC or protobuf types, no
//! database and no random source in its dependency tree, and no clock, file,
//! network, process or environment access in its source. Every replica must
//! compute the same state from the same log; anything read from the world
//! would make them differ.

use std::path::Path;
use std::process::Command;

#[test]
fn dependency_tree_has_no_runtime_rpc_database_or_randomness() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-p", "coop-core", "--edges", "normal,build,dev"])
        .args(["--prefix", "none", "--format", "{p}", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains(&"coop-core"), "{tree}");
    assert!(crates.contains(&"serde"), "the tree is listed: {tree}");
    for banned in [
        "tokio",
        "tonic",
        "prost",
        "protobuf",
        "sqlx",
        "rand",
        "getrandom",
        "raft",
        "hyper",
    ] {
        assert!(
            !crates.contains(&banned),
            "coop-core depends on {banned}:\n{tree}"
        );
    }
}

#[test]
fn source_reads_no_clock_file_network_process_or_environment() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in walk(&src) {
        let text = std::fs::read_to_string(&entry).unwrap();
        checked += 1;
        for forbidden in [
            "SystemTime",
            "Instant",
            "std::fs",
            "std::net",
            "std::process",
            "std::env",
            "std::thread",
            "println!",
            "eprintln!",
        ] {
            assert!(
                !text.contains(forbidden),
                "{} uses {forbidden}",
                entry.display()
            );
        }
    }
    assert!(checked >= 10, "only {checked} files found under {src:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}
