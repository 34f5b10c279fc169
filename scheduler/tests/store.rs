//! The raft log in SQLite, on one node: what was acknowledged is there after a
//! restart, through snapshots and the log tail alike.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use coop_scheduler::consensus::core::Timing;
use coop_scheduler::consensus::disk::Disk;
use coop_scheduler::replica::{Replica, ReplicaConfig};
use coop_scheduler::state::Op;

fn member(i: usize) -> Op {
    Op::AddMember {
        name: format!("m{i}"),
        token_hash: format!("h{i}"),
    }
}

async fn start(db: &Path, snapshot_every: u64) -> Replica {
    Replica::start(ReplicaConfig {
        id: 1,
        address: "http://127.0.0.1:1".into(),
        peers: BTreeMap::from([(1, "http://127.0.0.1:1".to_string())]),
        db: db.to_path_buf(),
        timing: Timing {
            snapshot_every,
            ..Default::default()
        },
        tick: Duration::from_millis(10),
        peer_token: None,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn acknowledged_commands_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let replica = start(&db, 10_000).await;
    let results = futures::future::join_all((0..50).map(|i| replica.propose(member(i)))).await;
    assert!(results.iter().all(|r| r.is_ok()));
    // A rejected proposal (duplicate name) is logged but changes nothing.
    assert!(replica.propose(member(3)).await.is_err());
    let expected = replica.read().clone();
    let applied = *replica.applied().borrow();
    replica.stop().await;

    let replica = start(&db, 10_000).await;
    // The log is replayed as the node commits again in its new term.
    replica.read_current().await.unwrap();
    assert_eq!(*replica.read(), expected);
    assert_eq!(replica.read().members.len(), 50);
    assert!(*replica.applied().borrow() > applied);
    replica.stop().await;
}

#[tokio::test]
async fn snapshots_compact_the_log_and_restore_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let replica = start(&db, 10).await;
    for i in 0..25 {
        replica.propose(member(i)).await.unwrap();
    }
    let expected = replica.read().clone();
    replica.stop().await;

    let log = Disk::open(&db)
        .await
        .unwrap()
        .load()
        .await
        .unwrap()
        .unwrap();
    assert!(
        log.snapshot_index() >= 20,
        "snapshot at {}",
        log.snapshot_index()
    );
    assert!(
        log.entries.len() < 10,
        "{} entries left after compaction",
        log.entries.len()
    );

    let replica = start(&db, 10).await;
    replica.read_current().await.unwrap();
    assert_eq!(*replica.read(), expected);
    replica.stop().await;
}
