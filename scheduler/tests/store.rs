//! The SQLite log: what was acknowledged is there after a restart, through
//! snapshots and the log tail alike.

use coop_scheduler::replica::Replica;
use coop_scheduler::state::{Command, Op, State};
use coop_scheduler::store::Store;

fn member(i: usize) -> Op {
    Op::AddMember {
        name: format!("m{i}"),
        token_hash: format!("h{i}"),
    }
}

#[tokio::test]
async fn acknowledged_commands_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let expected = {
        let replica = Replica::start(Store::open(&path).await.unwrap())
            .await
            .unwrap();
        let results = futures::future::join_all((0..50).map(|i| replica.propose(member(i)))).await;
        assert!(results.iter().all(|r| r.is_ok()));
        // A rejected proposal (duplicate name) is logged but changes nothing.
        assert!(replica.propose(member(3)).await.is_err());
        replica.read().clone()
    };
    let replica = Replica::start(Store::open(&path).await.unwrap())
        .await
        .unwrap();
    assert_eq!(*replica.read(), expected);
    assert_eq!(replica.read().members.len(), 50);
    assert_eq!(*replica.applied().borrow(), 51);
}

#[tokio::test]
async fn a_snapshot_plus_the_log_tail_gives_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    let mut state = State::default();
    let cmds: Vec<Command> = (0..10)
        .map(|i| Command {
            at_ms: i as i64,
            op: member(i),
        })
        .collect();
    store.append(1, &cmds[..6]).await.unwrap();
    for c in &cmds[..6] {
        state.apply(c).unwrap();
    }
    store
        .snapshot(6, serde_json::to_string(&state).unwrap())
        .await
        .unwrap();
    store.append(7, &cmds[6..]).await.unwrap();
    for c in &cmds[6..] {
        state.apply(c).unwrap();
    }
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.state, state);
    assert_eq!(loaded.applied, 10);
    assert_eq!(loaded.snapshot_index, 6);
}
