//! The raft log in SQLite, on one node: what was acknowledged is there after a
//! restart, through snapshots and the log tail alike.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use coop_core::state::Op;
use coop_scheduler::consensus::core::Timing;
use coop_scheduler::consensus::disk::Disk;
use coop_scheduler::replica::{Replica, ReplicaConfig};

fn member(i: usize) -> Op {
    Op::AddMember {
        name: format!("m{i}"),
        token_hash: format!("h{i}"),
        expires_at_ms: None,
    }
}

async fn start(db: &Path, snapshot_every: u64) -> Replica {
    Replica::start(config(db, snapshot_every)).await.unwrap()
}

fn config(db: &Path, snapshot_every: u64) -> ReplicaConfig {
    ReplicaConfig {
        id: 1,
        address: "http://127.0.0.1:1".into(),
        peers: BTreeMap::from([(1, "http://127.0.0.1:1".to_string())]),
        db: db.to_path_buf(),
        timing: Timing {
            snapshot_every,
            ..Default::default()
        },
        tick: Duration::from_millis(10),
        tls: None,
        join: false,
        client_address: String::new(),
    }
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
    assert_eq!(*replica.read(), *expected);
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
    // Snapshots are built off the node loop: wait until one is stored.
    let mut view = replica.view();
    tokio::time::timeout(
        Duration::from_secs(10),
        view.wait_for(|v| v.status.as_ref().is_some_and(|s| s.snapshot_index >= 20)),
    )
    .await
    .expect("no snapshot at 20 or later within 10 s")
    .unwrap();
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
    assert_eq!(*replica.read(), *expected);
    replica.stop().await;
}

/// The simulation's disk (`Log::persist`) and the SQLite one make the same
/// changes: appends that replace a suffix, our own snapshots that compact, a
/// leader's snapshot that replaces the log, hard and conf states.
#[tokio::test]
async fn the_sqlite_log_and_the_simulated_disk_agree() {
    use coop_scheduler::consensus::log::Persist;
    use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

    fn entries(from: u64, to: u64, term: u64) -> Vec<Entry> {
        (from..=to)
            .map(|index| Entry {
                index,
                term,
                data: format!("e{index}t{term}").into_bytes().into(),
                ..Default::default()
            })
            .collect()
    }
    fn snapshot(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
        let mut s = Snapshot {
            data: format!("state at {index}").into_bytes().into(),
            ..Default::default()
        };
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().mut_conf_state().voters = voters;
        s
    }
    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }
    let steps = [
        Persist {
            entries: entries(1, 10, 1),
            hard_state: Some(hs(1, 1, 4)),
            conf_state: Some(ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            }),
            ..Default::default()
        },
        // A new leader overwrites an uncommitted suffix.
        Persist {
            entries: entries(7, 12, 2),
            hard_state: Some(hs(2, 2, 8)),
            ..Default::default()
        },
        // Our own snapshot at 9 drops the entries it covers.
        Persist {
            snapshot: Some(snapshot(9, 2, vec![1, 2, 3])),
            ..Default::default()
        },
        Persist {
            entries: entries(13, 15, 2),
            ..Default::default()
        },
        // A leader's snapshot replaces everything.
        Persist {
            snapshot: Some(snapshot(20, 3, vec![1, 2, 3, 4])),
            replace_log: true,
            hard_state: Some(hs(3, 0, 20)),
            ..Default::default()
        },
        Persist {
            entries: entries(21, 22, 3),
            ..Default::default()
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::open(&dir.path().join("log.db")).await.unwrap();
    let mut mem = coop_scheduler::consensus::log::Log::default();
    for (i, p) in steps.iter().enumerate() {
        disk.persist(p).await.unwrap();
        mem.persist(p);
        let loaded = disk.load().await.unwrap().unwrap();
        let mem = mem.clone().normalised();
        assert_eq!(loaded.hard_state, mem.hard_state, "step {i}");
        assert_eq!(loaded.conf_state, mem.conf_state, "step {i}");
        assert_eq!(loaded.snapshot, mem.snapshot, "step {i}");
        assert_eq!(loaded.entries, mem.entries, "step {i}");
    }
    let end = disk.load().await.unwrap().unwrap();
    assert_eq!(end.first(), 21);
    assert_eq!(end.last(), 22);
    assert_eq!(end.conf_state.voters, vec![1, 2, 3, 4]);
}

async fn pool(db: &Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap()
}

/// Rewrites the data of the second-to-last raft entry of a stopped node.
async fn rewrite_entry(db: &Path, edit: impl FnOnce(serde_json::Value) -> Vec<u8>) -> i64 {
    use protobuf::Message as _;
    use sqlx::Row;
    let p = pool(db).await;
    let row = sqlx::query("SELECT idx, entry FROM raft_entries ORDER BY idx DESC LIMIT 1 OFFSET 1")
        .fetch_one(&p)
        .await
        .unwrap();
    let (idx, bytes): (i64, Vec<u8>) = (row.get(0), row.get(1));
    let mut entry = raft::eraftpb::Entry::parse_from_bytes(&bytes).unwrap();
    let written: serde_json::Value = serde_json::from_slice(&entry.data).unwrap();
    assert_eq!(
        written["format"],
        coop_core::codec::FORMAT,
        "entries carry their format: {written}"
    );
    entry.data = edit(written).into();
    sqlx::query("UPDATE raft_entries SET entry = ? WHERE idx = ?")
        .bind(entry.write_to_bytes().unwrap())
        .bind(idx)
        .execute(&p)
        .await
        .unwrap();
    p.close().await;
    idx
}

#[tokio::test]
async fn a_committed_entry_that_cannot_be_read_exactly_stops_the_node() {
    type Edit = fn(serde_json::Value) -> Vec<u8>;
    let cases: [(&str, Edit, &str); 5] = [
        (
            "an unknown command",
            |_| br#"{"format":2,"value":{"at_ms":1,"op":{"NoSuchOp":{}}}}"#.to_vec(),
            "does not decode",
        ),
        (
            "a newer format",
            |mut v| {
                v["format"] = (coop_core::codec::FORMAT + 1).into();
                serde_json::to_vec(&v).unwrap()
            },
            "newer coop",
        ),
        (
            "a field this build does not know",
            |mut v| {
                v["value"]["op"]["AddMember"]["quota_gpus"] = 8.into();
                serde_json::to_vec(&v).unwrap()
            },
            "quota_gpus is not a known field",
        ),
        (
            "a field left out",
            |mut v| {
                v["value"]["op"]["AddMember"]
                    .as_object_mut()
                    .unwrap()
                    .remove("expires_at_ms");
                serde_json::to_vec(&v).unwrap()
            },
            "expires_at_ms is missing",
        ),
        (
            "an entry from before formats",
            |v| serde_json::to_vec(&v["value"]).unwrap(),
            "before format 1",
        ),
    ];
    for (what, edit, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let replica = start(&db, 10_000).await;
        for i in 0..3 {
            replica.propose(member(i)).await.unwrap();
        }
        replica.stop().await;
        // The second of the three commands is rewritten outside raft: what
        // follows it must not be applied.
        let idx = rewrite_entry(&db, edit).await;

        // Replaying it, the node stops and says why, rather than skip it or
        // apply something other than what was written.
        let replica = start(&db, 10_000).await;
        let why = tokio::time::timeout(Duration::from_secs(10), replica.failure())
            .await
            .unwrap_or_else(|_| panic!("{what}: the node went on past an entry it cannot read"));
        assert!(
            why.contains(&format!("committed log entry {idx}")) && why.contains(says),
            "{what}: {why}"
        );
        // It applied nothing from there on: the first command only.
        assert_eq!(replica.read().members.len(), 1, "{what}");
        replica.stop().await;
    }
}

#[tokio::test]
async fn a_snapshot_that_cannot_be_decoded_refuses_the_start() {
    use protobuf::Message as _;
    use sqlx::Row;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let replica = start(&db, 5).await;
    for i in 0..12 {
        replica.propose(member(i)).await.unwrap();
    }
    let mut view = replica.view();
    tokio::time::timeout(
        Duration::from_secs(10),
        view.wait_for(|v| v.status.as_ref().is_some_and(|s| s.snapshot_index >= 5)),
    )
    .await
    .expect("no snapshot within 10 s")
    .unwrap();
    replica.stop().await;

    let p = pool(&db).await;
    let row = sqlx::query("SELECT value FROM raft_meta WHERE key = 'snapshot'")
        .fetch_one(&p)
        .await
        .unwrap();
    let mut snap = raft::eraftpb::Snapshot::parse_from_bytes(&row.get::<Vec<u8>, _>(0)).unwrap();
    let written: serde_json::Value = serde_json::from_slice(&snap.data).unwrap();
    assert_eq!(
        written["format"],
        coop_core::codec::FORMAT,
        "snapshots carry their format"
    );
    snap.data = b"not a snapshot".to_vec().into();
    sqlx::query("UPDATE raft_meta SET value = ? WHERE key = 'snapshot'")
        .bind(snap.write_to_bytes().unwrap())
        .execute(&p)
        .await
        .unwrap();
    p.close().await;

    let err = Replica::start(config(&db, 5))
        .await
        .err()
        .expect("started on a snapshot it cannot decode");
    assert!(
        format!("{err:#}").contains("the snapshot at")
            && format!("{err:#}").contains("cannot be read"),
        "{err:#}"
    );
}

/// The whole audit chain as this replica's store holds it now.
async fn stored_chain(replica: &Replica) -> Vec<coop_core::ledger::Record> {
    let index = replica.read_indexed().1;
    let pool = replica.history_at(index).await.unwrap();
    coop_scheduler::consensus::archive::audit_between(pool, i64::MIN, i64::MAX, 0, u32::MAX)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_history_is_stored_as_it_is_applied_and_a_replay_stores_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    // Snapshots every 5 entries: the log is compacted, the history is not.
    let replica = start(&db, 5).await;
    for i in 0..20 {
        replica.propose(member(i)).await.unwrap();
    }
    let chain = stored_chain(&replica).await;
    let head = replica.read().chain.clone();
    assert_eq!(chain.len(), 20, "one record per member added");
    assert_eq!(coop_core::ledger::verify(&chain), Ok(()));
    let last = chain.last().unwrap();
    assert_eq!((last.seq, &last.hash), (head.seq, &head.hash));
    // What the state keeps of it: the head, not the records.
    let snapshot = coop_core::codec::encode(&*replica.read());
    assert!(
        !String::from_utf8_lossy(&snapshot).contains("member_added"),
        "the state holds no audit record"
    );
    replica.stop().await;

    // A restart replays the entries after its snapshot: the same records
    // again, stored once.
    let replica = start(&db, 5).await;
    replica.read_current().await.unwrap();
    assert_eq!(replica.read().chain, head);
    assert_eq!(stored_chain(&replica).await, chain);
    replica.propose(member(99)).await.unwrap();
    let after = stored_chain(&replica).await;
    assert_eq!(after.len(), 21);
    assert_eq!(coop_core::ledger::verify(&after), Ok(()));
    replica.stop().await;
}

#[tokio::test]
async fn finished_jobs_leave_memory_after_the_retention_and_are_read_from_the_store() {
    use coop_core::policy::Setting;
    use coop_core::state::{JobKind, JobSpec, JobState};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let replica = start(&db, 10_000).await;
    replica
        .propose(Op::Bootstrap {
            operator_token_hash: "op".into(),
            default_member: None,
        })
        .await
        .unwrap();
    replica.propose(member(1)).await.unwrap();
    replica
        .propose(Op::EnrollNode {
            node: "n1".into(),
            owner: "m1".into(),
            join_hash: "j".into(),
            expires_at_ms: i64::MAX,
        })
        .await
        .unwrap();
    replica
        .propose(Op::RegisterNode {
            node: "n1".into(),
            owner: "m1".into(),
            gpus: vec![coop_core::state::GpuInfo {
                uuid: "GPU-0".into(),
                index: 0,
                model: "A100-80GB".into(),
                memory_mb: 81_920,
                measured: None,
                power_limit_w: 400,
            }],
            session: "s".into(),
            orphaned_runs_end_ms: 0,
            address: String::new(),
            site: String::new(),
        })
        .await
        .unwrap();
    replica
        .propose(Op::SetPolicy {
            settings: vec![Setting::JobRetentionS(1)],
            by: "operator".into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let id = uuid::Uuid::from_u128(7);
    let spec = JobSpec {
        kind: JobKind::Finetune,
        gpus: 1,
        command: vec!["train".into()],
        gpu_model: None,
        min_gpu_memory_mb: 0,
        preemptible: false,
        kill_grace_ms: 1_000,
        priority: 0,
        time_limit_ms: 0,
        isolation: Default::default(),
        env: Default::default(),
        nodes: 0,
        gpus_per_node: 0,
    };
    replica
        .propose(Op::SubmitJob {
            id,
            member: "m1".into(),
            spec,
        })
        .await
        .unwrap();
    replica.propose(Op::CancelJob { id }).await.unwrap();
    assert_eq!(replica.read().jobs[&id].state, JobState::Cancelled);
    // Commands move the state's clock on; one stamped a second after the
    // cancel retires the job.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut i = 100;
    while replica.read().jobs.contains_key(&id) {
        assert!(tokio::time::Instant::now() < deadline, "never retired");
        replica.propose(member(i)).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (index, finished) = {
        let (s, index) = replica.read_indexed();
        (index, s.finished.len())
    };
    assert_eq!(finished, 0, "nothing finished is left in memory");
    let pool = replica.history_at(index).await.unwrap();
    let job = coop_scheduler::consensus::archive::retired_job(pool, index, id)
        .await
        .unwrap()
        .expect("in the store");
    assert_eq!((job.id, job.state), (id, JobState::Cancelled));
    // A read at an index before the retirement does not see it there (it
    // was in memory then).
    let earlier = coop_scheduler::consensus::archive::retired_job(pool, 1, id)
        .await
        .unwrap();
    assert!(earlier.is_none());
    replica.stop().await;

    // After a restart the job is in the store still, and not back in memory.
    let replica = start(&db, 10_000).await;
    replica.read_current().await.unwrap();
    assert!(!replica.read().jobs.contains_key(&id));
    let index = replica.read_indexed().1;
    let pool = replica.history_at(index).await.unwrap();
    let again = coop_scheduler::consensus::archive::retired_job(pool, index, id)
        .await
        .unwrap();
    assert_eq!(again, Some(job));
    replica.stop().await;
}

#[tokio::test]
async fn a_database_another_coop_made_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    // The tables of an older coop, without this one's version mark.
    let p = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE raft_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        .execute(&p)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE usage (seq INTEGER PRIMARY KEY, member TEXT NOT NULL)")
        .execute(&p)
        .await
        .unwrap();
    p.close().await;
    let err = Disk::open(&db).await.err().expect("opened an older store");
    assert!(
        format!("{err:#}").contains("store version 0") && format!("{err:#}").contains("empty"),
        "{err:#}"
    );
    // A new one is made at this version and opens again.
    let fresh = dir.path().join("fresh.db");
    Disk::open(&fresh).await.unwrap().close().await;
    Disk::open(&fresh).await.unwrap().close().await;
}

/// A reader holding the state for as long as it likes (a slow `job list`, a
/// statement) holds up no write: the view it holds stays as it was, and the
/// next read sees the write. (With a read lock over the state, the write
/// would wait for the reader and this test would time out.)
#[tokio::test]
async fn a_reader_holding_the_state_blocks_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let replica = start(&dir.path().join("s.db"), 10_000).await;
    replica.propose(member(0)).await.unwrap();
    let (held, index) = replica.read_indexed();
    for i in 1..20 {
        tokio::time::timeout(Duration::from_secs(10), replica.propose(member(i)))
            .await
            .expect("the write was not held up by the reader")
            .unwrap();
    }
    assert_eq!(held.members.len(), 1);
    let (now, later) = replica.read_indexed();
    assert_eq!(now.members.len(), 20);
    assert!(later > index, "{later} after {index}");
    assert!(!held.members.contains_key("m19"));
    replica.stop().await;
}
