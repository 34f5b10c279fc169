use super::*;
use crate::consensus::archive::{Source, insert};
use crate::consensus::disk::Disk;
use crate::consensus::history::{Item, Tagged};
use coop_core::ledger::{Entry, Head};
use coop_core::usage::{MemberUsage, Past, Statement, add_past_usage};

/// Every record meeting the window, read one by one: what the rollups must
/// add up to.
async fn every_record(
    pool: &SqlitePool,
    upto: u64,
    from_ms: i64,
    to_ms: i64,
    member: Option<&str>,
) -> Vec<UsageRecord> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        usage_columns!(),
        " FROM usage WHERE (? IS NULL OR member = ?) AND end_ms >= ? AND start_ms <= ? \
         AND idx <= ?"
    ))
    .bind(member)
    .bind(member)
    .bind(from_ms)
    .bind(to_ms)
    .bind(sql_int(upto))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.iter().map(|r| usage_row(r).unwrap()).collect()
}

struct Gen(u64);

impl Gen {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// A record over about five days: some of no length (an exit's energy),
    /// some long, some across midnight.
    fn record(&mut self) -> UsageRecord {
        let mut start = self.next(5 * DAY as u64) as i64;
        let len = [0, 1, 30_000, 700_000, 2 * HOUR, 30 * HOUR][self.next(6) as usize];
        if len == 0 && self.next(2) == 0 {
            // On the hour: at the very end of a window that ends there.
            start -= start % HOUR;
        }
        UsageRecord {
            job: uuid::Uuid::from_u128(self.next(50) as u128),
            attempt: 1,
            member: ["a", "b"][self.next(2) as usize].into(),
            node: "n".into(),
            model: ["A100", "H100"][self.next(2) as usize].into(),
            gpus: 2,
            start_ms: start,
            end_ms: start + len,
            gpu_ms: len as u64 * 2 + self.next(2),
            weighted_gpu_ms: len as u64 * 3,
            energy_mj: self.next(1_000_000),
        }
    }
}

/// Windows of every shape: whole days, whole hours, neither, too short for
/// any bucket, empty, and past every record.
fn windows(g: &mut Gen) -> Vec<(i64, i64)> {
    let mut w = vec![
        (0, 6 * DAY),
        (DAY, 3 * DAY),
        (HOUR, 3 * HOUR),
        (DAY + 1, 3 * DAY - 1),
        (2 * DAY - 30 * 60_000, 2 * DAY + 30 * 60_000),
        (4_999, 5_001),
        (7 * HOUR, 7 * HOUR),
        (10 * DAY, 11 * DAY),
    ];
    for _ in 0..12 {
        let from = g.next(5 * DAY as u64) as i64;
        w.push((from, from + g.next(3 * DAY as u64) as i64));
    }
    w
}

/// The window's figures both ways, for usage and for a statement.
async fn check(pool: &SqlitePool, upto: u64, from: i64, to: i64) {
    for member in [None, Some("a")] {
        let all = every_record(pool, upto, from, to, member).await;
        let w = usage_window(pool, upto, from, to, member).await.unwrap();
        let zero = |m: &str| MemberUsage {
            member: m.into(),
            ..Default::default()
        };
        let mut by_record = vec![zero("a"), zero("b")];
        let mut summed = by_record.clone();
        let whole = Past {
            usage: &all,
            ..Default::default()
        };
        add_past_usage(&mut by_record, whole, from, to);
        let split = Past {
            usage: &w.records,
            sums: &w.sums,
            ..Default::default()
        };
        add_past_usage(&mut summed, split, from, to);
        assert_eq!(
            summed, by_record,
            "window {from}..{to} at {upto}, {member:?}"
        );
        if to - from >= 2 * DAY && upto == 40 {
            assert!(!w.sums.is_empty(), "no rollup used for {from}..{to}");
        }
        let Some(m) = member else { continue };
        let jobs = usage_jobs(pool, upto, from, to, m).await.unwrap();
        let statement = |past: Past<'_>| {
            let mut st = Statement {
                member: m.into(),
                from_ms: from,
                to_ms: to,
                ..Default::default()
            };
            st.add_past(past);
            st
        };
        let split = Past {
            usage: &w.records,
            sums: &w.sums,
            jobs: &jobs,
            ..Default::default()
        };
        assert_eq!(
            statement(split),
            statement(whole),
            "statement {from}..{to} at {upto}"
        );
    }
}

async fn store(dir: &tempfile::TempDir) -> Disk {
    Disk::open(&dir.path().join("s.db")).await.unwrap()
}

async fn write(disk: &Disk, items: &Tagged, source: Source) {
    let mut tx = disk.pool().begin().await.unwrap();
    insert(&mut tx, items, source).await.unwrap();
    tx.commit().await.unwrap();
}

/// 600 records in 40 entries of 15.
fn history(g: &mut Gen) -> Tagged {
    let mut head = Head::default();
    let mut items = Tagged::new();
    for i in 0..600u64 {
        let u = g.record();
        items.push((
            i / 15 + 1,
            Item::Record(head.link(u.end_ms, Entry::Usage(u))),
        ));
    }
    items
}

#[tokio::test]
async fn rollups_and_edges_give_the_figures_of_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let disk = store(&dir).await;
    let mut g = Gen(0x2545_f491_4f6c_dd1d);
    let items = history(&mut g);
    write(&disk, &items, Source::Apply).await;
    // Read at the store's end and at earlier entries, whose later records
    // the rollups already hold.
    for (from, to) in windows(&mut g) {
        for upto in [40, 39, 20, 1, 0] {
            check(disk.pool(), upto, from, to).await;
        }
    }
}

/// A replay writes the same records again; a peer's page only fills in; a
/// record the log now makes differently (changed outside coop) replaces the
/// stored one: the rollups follow each.
#[tokio::test]
async fn rollups_follow_replays_copies_and_replaced_records() {
    let dir = tempfile::tempdir().unwrap();
    let disk = store(&dir).await;
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    let mut items = history(&mut g);
    write(&disk, &items, Source::Apply).await;
    write(&disk, &items, Source::Apply).await;
    write(&disk, &items, Source::Copy).await;
    // A node that copied all of it from a peer has the same rollups.
    let copied_dir = tempfile::tempdir().unwrap();
    let copied = store(&copied_dir).await;
    write(&copied, &items, Source::Copy).await;
    for item in items.iter_mut().step_by(7) {
        if let Item::Record(r) = &mut item.1
            && let Entry::Usage(u) = &mut r.entry
        {
            let moved = g.record();
            (u.start_ms, u.end_ms, u.gpu_ms) = (moved.start_ms, moved.end_ms, moved.gpu_ms);
            u.model = moved.model;
        }
    }
    for (from, to) in windows(&mut g) {
        check(copied.pool(), 40, from, to).await;
    }
    write(&disk, &items, Source::Apply).await;
    for (from, to) in windows(&mut g) {
        check(disk.pool(), 40, from, to).await;
    }
}

/// A store written before the rollups (store version 2) gets them when it
/// is opened.
#[tokio::test]
async fn a_version_2_store_gets_its_rollups_on_opening() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gen(0x1234_5678_9abc_def1);
    {
        let disk = store(&dir).await;
        write(&disk, &history(&mut g), Source::Apply).await;
        for ddl in [
            "DROP TABLE usage_rollup",
            "DELETE FROM history_meta WHERE key = 'usage_max_ms'",
            "PRAGMA user_version = 2",
        ] {
            sqlx::query(ddl).execute(disk.pool()).await.unwrap();
        }
        disk.close().await;
    }
    let disk = store(&dir).await;
    for (from, to) in windows(&mut g) {
        check(disk.pool(), 40, from, to).await;
    }
}

#[tokio::test]
async fn a_usage_record_reads_back_from_its_columns_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let disk = store(&dir).await;
    let u = UsageRecord {
        job: uuid::Uuid::from_u128(42),
        attempt: 3,
        member: "acme".into(),
        node: "n7".into(),
        model: "H100-80GB".into(),
        gpus: 8,
        start_ms: 1_000,
        end_ms: 31_000,
        gpu_ms: 240_000,
        weighted_gpu_ms: 510_000,
        energy_mj: 99_000_000,
    };
    let mut head = Head::default();
    let r = head.link(31_000, Entry::Usage(u.clone()));
    write(&disk, &vec![(5, Item::Record(r))], Source::Apply).await;
    let pool = disk.pool();
    let read = |upto, from, to, member| async move {
        usage_window(pool, upto, from, to, member)
            .await
            .unwrap()
            .records
    };
    assert_eq!(read(5, 0, 2_000, Some("acme")).await, vec![u.clone()]);
    assert_eq!(read(5, 0, 2_000, None).await, vec![u]);
    // Not at an earlier index, nor another member's, nor outside the window.
    assert!(read(4, 0, 2_000, None).await.is_empty());
    assert!(read(5, 0, 2_000, Some("b")).await.is_empty());
    assert!(read(5, 31_001, 40_000, None).await.is_empty());
    assert_eq!(
        crate::consensus::archive::attempt_node(pool, uuid::Uuid::from_u128(42), 3)
            .await
            .unwrap(),
        Some("n7".into())
    );
}
