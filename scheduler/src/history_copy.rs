//! Copies the history a replica lacks after installing a snapshot from its
//! peers (see `history`).

use std::time::Duration;

use crate::consensus::archive;
use crate::consensus::history::Gap;
use crate::history::fill;
use crate::replica::Replica;

/// Copies the history this replica lacks from its peers, the leader first,
/// page by page, until it has it all; runs while the node does.
pub async fn run(replica: Replica) {
    let (writer, progress) = replica.history_writer();
    let mut gap = replica.history().watch_gap();
    let mut alive = replica.applied();
    let mut backoff = Duration::from_millis(200);
    let mut round = 0usize;
    loop {
        let Some(g) = gap.borrow_and_update().clone() else {
            tokio::select! {
                r = gap.changed() => if r.is_err() { return },
                r = alive.changed() => if r.is_err() { return },
            }
            continue;
        };
        // What the database holds after the write is what readers are told.
        let copied = {
            let _writing = progress.gap_writer.lock().await;
            let copied = copy_page(&replica, &writer, &g, round).await;
            if copied.is_ok() {
                match archive::gap(&writer).await {
                    Ok(now) => {
                        progress.gap.send_replace(now);
                    }
                    Err(e) => tracing::warn!("history: reading the gap back: {e:#}"),
                }
            }
            copied
        };
        match copied {
            Ok(left) => {
                backoff = Duration::from_millis(200);
                if left.is_none() {
                    tracing::info!("history: copied the history of entries up to {}", g.to);
                }
            }
            Err(e) => {
                round += 1;
                tracing::warn!(
                    "history: copying entries {} to {}: {e:#}; trying again in {backoff:?}",
                    g.from + 1,
                    g.to
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    r = alive.changed() => if r.is_err() { return },
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One page from the first peer that gives one that checks out: the leader
/// first, then the others; after a failed round, starting one further on,
/// so that a peer whose history is bad cannot hold the copy up.
async fn copy_page(
    replica: &Replica,
    writer: &sqlx::SqlitePool,
    gap: &Gap,
    round: usize,
) -> anyhow::Result<Option<Gap>> {
    let (peers, leader) = {
        let v = replica.view().borrow().clone();
        (v.peers, v.status.map(|s| s.leader).unwrap_or(0))
    };
    let mut order: Vec<(u64, String)> = peers
        .into_iter()
        .filter(|(id, _)| *id != replica.id())
        .collect();
    order.sort_by_key(|(id, _)| *id != leader);
    if !order.is_empty() {
        let n = order.len();
        order.rotate_left(round % n);
    }
    let mut why = Vec::new();
    for (id, address) in order {
        let page = match replica.peer_history(&address, gap.from, gap.to).await {
            Ok(page) => page,
            Err(e) => {
                why.push(format!("scheduler {id}: {e:#}"));
                continue;
            }
        };
        match fill(writer, gap, &page).await {
            Ok(left) => return Ok(left),
            Err(e) => {
                tracing::warn!("history: the page from scheduler {id} was refused: {e:#}");
                why.push(format!("scheduler {id}'s page: {e:#}"));
            }
        }
    }
    anyhow::bail!("no peer gave it ({})", why.join("; "))
}
