//! The core stays pure: its direct dependencies are a short, fixed list; no
//! async runtime, gRPC or protobuf types, database or random source anywhere
//! in its tree; and no clock, file, network, process, terminal or environment
//! access in its source (a scan for the std paths and macros that reach them). Every replica must
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
    // Its own dependencies are exactly these (a new one is a decision, made here).
    let direct = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "tree",
            "-p",
            "coop-core",
            "--edges",
            "normal,build,dev",
            "--depth",
            "1",
        ])
        .args(["--prefix", "none", "--format", "{p}", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    let direct: std::collections::BTreeSet<String> = String::from_utf8(direct.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "coop-core")
        .map(String::from)
        .collect();
    // imbl's persistent maps let readers share the state without a lock;
    // it brings rand_core and rand_xoshiro for its Vector's sort, seeded with
    // a constant (deterministic: no entropy, which `getrandom` would be).
    let allowed = [
        "hex",
        "imbl",
        "libm",
        "serde",
        "serde_json",
        "sha2",
        "thiserror",
        "uuid",
    ];
    assert_eq!(
        direct,
        allowed.iter().map(|c| c.to_string()).collect(),
        "coop-core's direct dependencies changed"
    );
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
            "std::io",
            "std::{",
            "UNIX_EPOCH",
            "new_v4",
            "now_v7",
            "print!",
            "println!",
            "eprintln!",
            "dbg!",
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
