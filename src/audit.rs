//! `coop audit export | verify`: the hash-chained ledger out of the cluster,
//! and checked without trusting it.

use std::io::Write;
use std::path::Path;
use std::time::UNIX_EPOCH;

use anyhow::{Context, anyhow, bail};
use coop_proto::v1 as pb;
use coop_scheduler::ledger::{self, Record};

use crate::args::{AuditCmd, AuditFormat, ClientArgs};
use crate::client::Client;

const CSV_HEADER: [&str; 6] = ["seq", "at_ms", "kind", "entry", "prev_hash", "hash"];

fn unix_ms(t: Option<std::time::SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

async fn fetch(cli: &ClientArgs, from_ms: i64, to_ms: i64) -> anyhow::Result<Vec<Record>> {
    let c = Client::connect(cli).await?;
    let mut stream = c
        .audit()
        .export(c.req(pb::ExportAuditRequest { from_ms, to_ms }))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await? {
        let rec: Record = serde_json::from_str(&r.json)
            .with_context(|| format!("entry {} from the cluster is not a ledger entry", r.seq))?;
        out.push(rec);
    }
    Ok(out)
}

pub async fn run(cli: &ClientArgs, cmd: AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::Export(a) => {
            let (from, to) = (unix_ms(a.from), unix_ms(a.to));
            if to > 0 && from > to {
                bail!("from: the period starts after it ends");
            }
            let records = fetch(cli, from, to).await?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            match a.format {
                AuditFormat::Jsonl => {
                    for r in &records {
                        writeln!(out, "{}", serde_json::to_string(r)?)?;
                    }
                }
                AuditFormat::Csv => {
                    let mut w = csv::Writer::from_writer(out);
                    w.write_record(CSV_HEADER)?;
                    for r in &records {
                        w.write_record([
                            r.seq.to_string(),
                            r.at_ms.to_string(),
                            r.entry.kind().to_string(),
                            serde_json::to_string(&r.entry)?,
                            r.prev_hash.clone(),
                            r.hash.clone(),
                        ])?;
                    }
                    w.flush()?;
                }
            }
            Ok(())
        }
        AuditCmd::Verify { file, db } => {
            let (records, source) = match (&file, &db) {
                (Some(path), _) => (read_export(path)?, path.display().to_string()),
                (None, Some(url)) => (
                    coop_scheduler::sink::read(url)
                        .await
                        .map_err(|e| anyhow!("db: {e:#}"))?,
                    "the accounting database".to_string(),
                ),
                (None, None) => (fetch(cli, 0, 0).await?, "the cluster".to_string()),
            };
            ledger::verify(&records).map_err(|b| anyhow!("{source}: {b}"))?;
            match (records.first(), records.last()) {
                (Some(first), Some(last)) => println!(
                    "verified {} entries of {source}: {} to {}, head {}",
                    records.len(),
                    first.seq,
                    last.seq,
                    last.hash
                ),
                _ => println!("verified {source}: the ledger is empty"),
            }
            Ok(())
        }
    }
}

/// An export in either format (CSV when the first line is the CSV header).
fn read_export(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("file: reading {}", path.display()))?;
    if text.starts_with("seq,") {
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let mut out = Vec::new();
        for (i, row) in r.records().enumerate() {
            let row = row.with_context(|| format!("file: row {}", i + 2))?;
            let bad = |what: &str| anyhow!("file: row {}: {what}", i + 2);
            out.push(Record {
                seq: row
                    .get(0)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad("seq"))?,
                at_ms: row
                    .get(1)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad("at_ms"))?,
                entry: row
                    .get(3)
                    .and_then(|v| serde_json::from_str(v).ok())
                    .ok_or_else(|| bad("entry is not a ledger entry"))?,
                prev_hash: row.get(4).ok_or_else(|| bad("prev_hash"))?.to_string(),
                hash: row.get(5).ok_or_else(|| bad("hash"))?.to_string(),
            });
        }
        return Ok(out);
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow!("file: line {}: not a ledger entry ({e})", i + 1))
        })
        .collect()
}
