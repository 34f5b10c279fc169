//! `coop audit export | head | verify`: the hash-chained ledger out of the
//! cluster, its signed head, and both checked without trusting the cluster.

use std::io::Write;
use std::path::Path;
use std::time::UNIX_EPOCH;

use anyhow::{Context, anyhow, bail};
use coop_core::ledger::{self, Record};
use coop_proto::v1 as pb;
use coop_scheduler::head::{self, SignedHead};
use serde_json::{Value, json};

use crate::args::{AuditCmd, AuditFormat, ClientArgs, Output};
use crate::client::Client;
use crate::view::{print_json, rfc3339};

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
            // The export is JSON lines unless --format csv: `-o json` agrees.
            if cli.output == Output::Json && a.format == AuditFormat::Csv {
                bail!("output: --output json and --format csv ask for two formats; choose one");
            }
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
        AuditCmd::Head => {
            let h = fetch_head(cli).await?;
            // Worth saving only if it verifies: checked before it is printed.
            head::check_signature(&h).map_err(|e| anyhow!("the scheduler's head: {e}"))?;
            match cli.output {
                Output::Json => print_json(&serde_json::to_value(&h)?),
                Output::Table => {
                    println!("head {} {}", h.seq, h.hash);
                    println!(
                        "signed by scheduler {} at {} with key {}",
                        h.scheduler_id,
                        rfc3339(h.at_ms).as_str().unwrap_or("?"),
                        h.public_key
                    );
                }
            }
            Ok(())
        }
        AuditCmd::Verify { file, db, since } => {
            let saved = match &since {
                // A head that is not one is a failed verification too.
                Some(path) => match read_head(path) {
                    Ok(h) => Some(h),
                    Err(e) => return fail(cli, None, e),
                },
                None => None,
            };
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
            if let Err(b) = ledger::verify(&records) {
                return fail(cli, Some(b.seq), format!("{source}: {b}"));
            }
            if let Some(h) = &saved
                && let Err(d) = head::extends(&records, h)
            {
                return fail(cli, Some(d.seq()), format!("{source}: {d}"));
            }
            // A saved head names the key that signed it; say so if the
            // scheduler that signed it now signs with another.
            let note = match (&saved, &file, &db) {
                (Some(h), None, None) => {
                    let now = fetch_head(cli).await?;
                    (now.scheduler_id == h.scheduler_id && now.public_key != h.public_key).then(
                        || {
                            format!(
                                "scheduler {} now signs with key {}, not with the saved head's {}: \
                                 its data dir was replaced, or the head was not signed by it",
                                h.scheduler_id, now.public_key, h.public_key
                            )
                        },
                    )
                }
                _ => None,
            };
            let last = records.last();
            match cli.output {
                Output::Json => {
                    let mut v = json!({
                        "ok": true,
                        "source": source,
                        "records": records.len(),
                        "first": records.first().map(|r| r.seq),
                        "last": last.map(|r| r.seq),
                        "head": last.map(|r| r.hash.clone()),
                        "since": saved.as_ref().map(since_json),
                    });
                    if let Some(n) = &note {
                        v["note"] = json!(n);
                    }
                    print_json(&v);
                }
                Output::Table => {
                    match (records.first(), last) {
                        (Some(first), Some(last)) => println!(
                            "verified {} entries of {source}: {} to {}, head {}",
                            records.len(),
                            first.seq,
                            last.seq,
                            last.hash
                        ),
                        _ => println!("verified {source}: the ledger is empty"),
                    }
                    if let Some(h) = &saved {
                        println!(
                            "it extends the saved head: entry {} {}, signed by scheduler {} at {} with key {}",
                            h.seq,
                            h.hash,
                            h.scheduler_id,
                            rfc3339(h.at_ms).as_str().unwrap_or("?"),
                            h.public_key
                        );
                    }
                    if let Some(n) = &note {
                        println!("note: {n}");
                    }
                }
            }
            Ok(())
        }
    }
}

async fn fetch_head(cli: &ClientArgs) -> anyhow::Result<SignedHead> {
    let c = Client::connect(cli).await?;
    let h = c
        .audit()
        .head(c.req(pb::AuditHeadRequest {}))
        .await?
        .into_inner();
    Ok(coop_scheduler::api::audit::head_from_pb(h))
}

fn since_json(h: &SignedHead) -> Value {
    json!({
        "seq": h.seq,
        "hash": h.hash,
        "scheduler_id": h.scheduler_id,
        "signed_at": rfc3339(h.at_ms),
        "public_key": h.public_key,
    })
}

/// A failed verification: with `--output json` the verdict on stdout too,
/// then the one-line error (and a non-zero exit).
fn fail(cli: &ClientArgs, seq: Option<u64>, message: String) -> anyhow::Result<()> {
    if cli.output == Output::Json {
        print_json(&json!({ "ok": false, "error": message, "seq": seq }));
    }
    Err(anyhow!(message))
}

/// A saved head, its fields checked one by one (so that an error names the
/// field) and its signature verified.
fn read_head(path: &Path) -> Result<SignedHead, String> {
    let name = path.display();
    let bad = |what: String| format!("since: {name}: {what}");
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("reading it: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "not JSON ({e}); save one with coop audit head -o json"
        ))
    })?;
    let string = |f: &str| {
        v.get(f)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| bad(format!("{f}: missing, or not a string")))
    };
    let number = |f: &str| {
        v.get(f)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("{f}: missing, or not a whole number")))
    };
    let h = SignedHead {
        format: string("format")?,
        seq: number("seq")?,
        hash: string("hash")?,
        at_ms: v
            .get("at_ms")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad("at_ms: missing, or not a whole number".into()))?,
        scheduler_id: number("scheduler_id")?,
        public_key: string("public_key")?,
        signature: string("signature")?,
    };
    head::check_signature(&h).map_err(|e| bad(e.to_string()))?;
    Ok(h)
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
